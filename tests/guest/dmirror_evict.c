// SPDX-License-Identifier: GPL-2.0
/*
 * Eviction of device memory: pages migrated to the device come back to
 * system memory, with their data, on RELEASE, on the last close of the
 * device, and the module unloads afterwards; so do huge pages, which go to
 * the device as one device THP; past the max_chunks cap, migration fails
 * with ENOMEM and loses nothing. Prints KTAP.
 *
 * Usage: dmirror_evict [DEVICE [CAPPED_INSMOD_ARGS]]: by default
 * /dev/hmm_dmirror0 (device-private) reloaded with max_chunks=1; for a
 * coherent device, the arguments that give it a single 256 MiB chunk.
 *
 * Built statically against the kernel tree's lib/test_hmm_uapi.h.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <lib/test_hmm_uapi.h>

#define NPAGES 512UL
#define PAGE 4096UL
#define PMD (NPAGES * PAGE)
#define CHUNK_PAGES (256UL << 20) / PAGE
#define ALL_PROT 0xf0

static int tests;
/* SNAPSHOT's value for a page in this device's memory. */
static unsigned char local_prot = HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL;
static int failed;

static void result(int ok, const char *name)
{
	tests++;
	if (!ok)
		failed++;
	printf("%s %d %s\n", ok ? "ok" : "not ok", tests, name);
	fflush(stdout);
}

static int cmd(int fd, unsigned long req, void *addr, void *ptr, unsigned long npages,
	       struct hmm_dmirror_cmd *out)
{
	struct hmm_dmirror_cmd c = {
		.addr = (uintptr_t)addr, .ptr = (uintptr_t)ptr, .npages = npages,
	};
	int ret = ioctl(fd, req, &c);

	if (out)
		*out = c;
	return ret ? -errno : 0;
}

static void fill_n(uint32_t *p, uint32_t seed, unsigned long npages)
{
	for (unsigned long i = 0; i < npages * PAGE / 4; i++)
		p[i] = seed ^ (uint32_t)(i * 2654435761u);
}

static int check_n(const uint32_t *p, uint32_t seed, unsigned long npages)
{
	for (unsigned long i = 0; i < npages * PAGE / 4; i++)
		if (p[i] != (seed ^ (uint32_t)(i * 2654435761u))) {
			printf("# word %lu: %#x\n", i, p[i]);
			return 0;
		}
	return 1;
}

static void fill(uint32_t *p, uint32_t seed)
{
	fill_n(p, seed, NPAGES);
}

static int check(const uint32_t *p, uint32_t seed)
{
	return check_n(p, seed, NPAGES);
}

/*
 * Counts pages of the buffer whose SNAPSHOT byte, masked with `mask`, is
 * `want`.
 */
static long count_n(int fd, void *buf, unsigned long npages, unsigned char mask,
		    unsigned char want)
{
	unsigned char *snap = malloc(npages);
	long n = 0;

	if (!snap || cmd(fd, HMM_DMIRROR_SNAPSHOT, buf, snap, npages, NULL)) {
		free(snap);
		return -1;
	}
	for (unsigned long i = 0; i < npages; i++)
		n += (snap[i] & mask) == want;
	free(snap);
	return n;
}

/* Counts pages of the buffer that SNAPSHOT reports in this device's memory. */
static long on_device(int fd, void *buf)
{
	return count_n(fd, buf, NPAGES, ALL_PROT, local_prot);
}

/* Counts pages of the buffer in this device's memory mapped by a PMD. */
static long on_device_huge(int fd, void *buf)
{
	return count_n(fd, buf, NPAGES, ALL_PROT | HMM_DMIRROR_PROT_PMD,
		       local_prot | HMM_DMIRROR_PROT_PMD);
}

static void *map_n(unsigned long npages)
{
	void *p = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static void *map(void)
{
	return map_n(NPAGES);
}

/* A PMD-aligned, PMD-sized buffer backed by a transparent huge page. */
static void *map_huge(uint32_t seed)
{
	char *p = map_n(2 * NPAGES);
	char *h;

	if (!p)
		return NULL;
	h = (char *)(((uintptr_t)p + PMD - 1) & ~(PMD - 1));
	if (madvise(h, PMD, MADV_HUGEPAGE))
		return NULL;
	fill((uint32_t *)h, seed);
	return h;
}

int main(int argc, char **argv)
{
	const char *dev = argc > 1 ? argv[1] : "/dev/hmm_dmirror0";
	const char *capped = argc > 2 ? argv[2] : "max_chunks=1";
	char insmod_capped[512];
	struct hmm_dmirror_cmd out;
	void *bounce = malloc(NPAGES * PAGE);
	void *a = map(), *b = map();
	void *ha = map_huge(3), *hb = map_huge(4);
	unsigned long cap_pages = CHUNK_PAGES + NPAGES;
	void *c = map_n(cap_pages);
	int fd, fd2, ret;

	if (dev[strlen(dev) - 1] >= '2')
		local_prot = HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL;
	snprintf(insmod_capped, sizeof(insmod_capped), "insmod /lib/modules/dmirror.ko %s",
		 capped);
	printf("KTAP version 1\n1..17\n# device %s\n", dev);
	if (!bounce || !a || !b || !ha || !hb || !c) {
		printf("# out of memory\n");
		return 1;
	}

	/* RELEASE brings every page back while the file stays open. */
	fd = open(dev, O_RDWR);
	fill(a, 1);
	result(fd >= 0 && !cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, a, bounce, NPAGES, &out) &&
	       out.cpages == NPAGES, "migrate_to_dev");
	result(on_device(fd, a) == (long)NPAGES, "snapshot_shows_device_pages");
	result(!cmd(fd, HMM_DMIRROR_RELEASE, a, NULL, 1, NULL) && on_device(fd, a) == 0,
	       "release_evicts_all_pages");
	result(check(a, 1), "release_data_intact");

	/* A huge page goes to the device whole, and comes back on RELEASE. */
	result(!cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, ha, bounce, NPAGES, &out) &&
	       on_device_huge(fd, ha) == (long)NPAGES, "huge_page_is_one_device_thp");
	result(!cmd(fd, HMM_DMIRROR_RELEASE, ha, NULL, 1, NULL) && on_device(fd, ha) == 0 &&
	       check(ha, 3), "release_evicts_device_thp_intact");

	/* The last close brings them back too, small and huge. */
	fill(b, 2);
	result(!cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, bounce, NPAGES, &out) &&
	       on_device(fd, b) == (long)NPAGES, "migrate_again");
	result(!cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, hb, bounce, NPAGES, &out) &&
	       on_device_huge(fd, hb) == (long)NPAGES, "migrate_huge_again");
	close(fd);
	fd2 = open(dev, O_RDWR);
	result(fd2 >= 0 && on_device(fd2, b) == 0 && on_device(fd2, hb) == 0,
	       "last_close_evicts_all_pages");
	close(fd2);
	result(check(b, 2) && check(hb, 4), "last_close_data_intact");

	/* With every file closed the module unloads, and the data stays. */
	result(system("rmmod dmirror") == 0, "rmmod_after_device_use");
	result(check(a, 1) && check(b, 2) && check(ha, 3) && check(hb, 4),
	       "data_intact_after_unload");

	/*
	 * One chunk of device memory at most: a range one PMD larger than it
	 * fills the device, fails with ENOMEM, and loses nothing.
	 */
	result(system(insmod_capped) == 0, "insmod_capped");
	fill_n(c, 5, cap_pages);
	fd = open(dev, O_RDWR);
	ret = fd < 0 ? -EBADF : cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, c, NULL, cap_pages, NULL);
	if (ret != -ENOMEM)
		printf("# MIGRATE_TO_DEV past the cap: %d\n", ret);
	result(ret == -ENOMEM, "past_cap_is_enomem");
	ret = count_n(fd, c, cap_pages, ALL_PROT, local_prot);
	if (ret != (long)CHUNK_PAGES)
		printf("# pages on the device: %d\n", ret);
	result(ret == (long)CHUNK_PAGES, "cap_filled_exactly");
	close(fd);
	result(check_n(c, 5, cap_pages), "capped_data_intact");
	result(system("rmmod dmirror") == 0, "rmmod_capped");
	return failed ? 1 : 0;
}
