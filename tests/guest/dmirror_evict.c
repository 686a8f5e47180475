// SPDX-License-Identifier: GPL-2.0
/*
 * Eviction of device memory: pages migrated to the device come back to
 * system memory, with their data, on RELEASE, on the last close of the
 * device, and the module unloads afterwards. Prints KTAP.
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

static int tests;
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

static void fill(uint32_t *p, uint32_t seed)
{
	for (unsigned long i = 0; i < NPAGES * PAGE / 4; i++)
		p[i] = seed ^ (uint32_t)(i * 2654435761u);
}

static int check(const uint32_t *p, uint32_t seed)
{
	for (unsigned long i = 0; i < NPAGES * PAGE / 4; i++)
		if (p[i] != (seed ^ (uint32_t)(i * 2654435761u))) {
			printf("# word %lu: %#x\n", i, p[i]);
			return 0;
		}
	return 1;
}

/* Counts pages of the buffer that SNAPSHOT reports in this device's memory. */
static long on_device(int fd, void *buf)
{
	unsigned char *snap = malloc(NPAGES);
	long n = 0;

	if (!snap || cmd(fd, HMM_DMIRROR_SNAPSHOT, buf, snap, NPAGES, NULL)) {
		free(snap);
		return -1;
	}
	for (unsigned long i = 0; i < NPAGES; i++)
		n += (snap[i] & 0xf0) == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL;
	free(snap);
	return n;
}

static void *map(void)
{
	void *p = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

int main(void)
{
	struct hmm_dmirror_cmd out;
	void *bounce = malloc(NPAGES * PAGE);
	void *a = map(), *b = map();
	int fd, fd2;

	printf("KTAP version 1\n1..9\n");
	if (!bounce || !a || !b) {
		printf("# out of memory\n");
		return 1;
	}

	/* RELEASE brings every page back while the file stays open. */
	fd = open("/dev/hmm_dmirror0", O_RDWR);
	fill(a, 1);
	result(fd >= 0 && !cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, a, bounce, NPAGES, &out) &&
	       out.cpages == NPAGES, "migrate_to_dev");
	result(on_device(fd, a) == (long)NPAGES, "snapshot_shows_device_pages");
	result(!cmd(fd, HMM_DMIRROR_RELEASE, a, NULL, 1, NULL) && on_device(fd, a) == 0,
	       "release_evicts_all_pages");
	result(check(a, 1), "release_data_intact");

	/* The last close brings them back too. */
	fill(b, 2);
	result(!cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b, bounce, NPAGES, &out) &&
	       on_device(fd, b) == (long)NPAGES, "migrate_again");
	close(fd);
	fd2 = open("/dev/hmm_dmirror0", O_RDWR);
	result(fd2 >= 0 && on_device(fd2, b) == 0, "last_close_evicts_all_pages");
	close(fd2);
	result(check(b, 2), "last_close_data_intact");

	/* With every file closed the module unloads, and the data stays. */
	result(system("rmmod dmirror") == 0, "rmmod_after_device_use");
	result(check(a, 1) && check(b, 2), "data_intact_after_unload");
	return failed ? 1 : 0;
}
