# dmirror: build the module, the bench kernel, and run the VM suites.
#
#   make demo      set up, build, boot, load dmirror, show it working
#   make test      every test: host unit tests, the VM suites, the regression cases on
#                  the stock kernel too, and the two columns side by side
#   make stock     the regression cases on the stock kernel alone
#   make mm-selftests  the kernel's mm selftests on both kernels, side by side
#   make compile-fail  the compile-fail cases (tests/compile-fail) alone, on the host
#   make kernel    build (or reuse) the cached kernel ($KERNEL_FLAVOUR)
#   make / make module, make clippy, make rust-analyzer, make checkpatch
#
# KDIR=<build tree> builds the module against another Rust-enabled kernel.

SHELL := /bin/bash
ROOT := $(CURDIR)
KERNEL_FLAVOUR ?= default
export KERNEL_FLAVOUR
BUILD := $(ROOT)/build/$(KERNEL_FLAVOUR)
TIMEOUT ?= 2400
# INJECT=warn adds a suite whose kernel warning must fail the run.
INJECT ?=
SEED ?=
BENCH_ARGS := --append dmirror.flavour=$(KERNEL_FLAVOUR) $(if $(INJECT),--append dmirror.inject=$(INJECT)) \
	$(if $(SEED),--append dmirror.seed=$(SEED))
BENCH := $(ROOT)/target/release/dmirror-bench
# The QEMU accelerator of every boot: tcg (the default), kvm, or auto (KVM if a 20 s probe boot
# under it reaches the kernel; nested KVM can hang, so auto never trusts /dev/kvm alone).
ACCEL ?= tcg
BENCH_RUN = $(BENCH) run --accel $(ACCEL)
# One boot: plan $(1) (the plans and their suites: crates/guest/src/plan.rs, or
# `dmirror-guest plans`) of kernel tree $(2) with initramfs $(3), and more arguments $(4).
boot_on = $(BENCH_RUN) --plan $(1) --kernel $(2)/arch/x86/boot/bzImage --initrd $(3) \
	--results $(ROOT)/results $(4)
# The same on the patched kernel with the main initramfs and the default timeout.
boot = $(call boot_on,$(1),$(KDIR),$(BUILD)/initramfs.cpio.gz,--timeout $(TIMEOUT) $(BENCH_ARGS) $(2))
comma := ,
space := $(subst ,, )

# The kernel tree: the cached bench kernel unless KDIR is given.
ifeq ($(origin KDIR),undefined)
KERNEL_DEP := kernel
KDIR = $(shell KERNEL_FLAVOUR=$(KERNEL_FLAVOUR) $(ROOT)/scripts/kernel path)
KSRC = $(shell KERNEL_FLAVOUR=$(KERNEL_FLAVOUR) $(ROOT)/scripts/kernel src)
else
KERNEL_DEP :=
KSRC = $(shell readlink -f $(KDIR)/source 2>/dev/null || echo $(KDIR))
endif

KMAKE_ARGS = LLVM=-22 RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
	CLIPPY_DRIVER=/usr/bin/clippy-driver \
	BINDGEN=$(HOME)/.cargo/bin/bindgen
KMAKE = $(MAKE) -C $(KDIR) $(KMAKE_ARGS)

# The stock kernel: the series' Rust patches only, none of its fixes (scripts/kernel).
# `make test` runs the regression cases on it too; its module builds from a copy of
# the sources in build/stock/module, so the tree's dmirror.ko stays the patched one.
STOCK_BUILD := $(ROOT)/build/stock
STOCK_KDIR = $(shell KERNEL_FLAVOUR=stock $(ROOT)/scripts/kernel path)

# The kernel's mm selftests (tools/testing/selftests/mm of the series' tree, with the series' own
# tests; built by scripts/build-mm-selftests) run in a boot of their own on each kernel, with two
# NUMA nodes and three CPUs (`migration` needs both); `dmirror-bench mm` puts the two runs side by
# side and fails on a regression, on a failure on both kernels without a reason in MM_KNOWN, or on
# a kernel report in the patched run. MM="cow gup" runs only the programs whose label contains one
# of the words.
MM ?=
MM_KNOWN := $(ROOT)/qemu/mm-selftests.known
# The series' own selftests, each of which must fail on stock and pass patched (not judged when MM
# selects programs).
MM_FIXED := $(ROOT)/qemu/mm-selftests.fixed
# Those of them that take the stock kernel down: left out of the stock run (dmirror.crash), run on
# stock one a boot (plan mm-crash-N for the Nth, oops=panic panic_on_warn=1), whose crash is their
# stock result.
MM_CRASH := $(ROOT)/qemu/mm-selftests.crash
MM_CRASH_CASES := $(shell sed -e '/^\#/d' -e '/^$$/d' -e 's/\t.*//' $(MM_CRASH))
MM_CRASH_N := $(shell seq $(words $(MM_CRASH_CASES)))
# proc_mem.force_override=always: mkdirty writes through /proc/self/mem (the bench kernel's
# default allows that only under ptrace).
# RERUN=1: boot the mm selftests and the stock kernel even when an earlier run of theirs had the
# same kernel image, initramfs and command line (dmirror-bench run --reuse).
RERUN ?=
REUSE = $(if $(RERUN),,--reuse)
MM_RUN = $(REUSE) --smp 3 --numa 2 --timeout 1800 --append dmirror.suite_timeout=1500 \
	--append proc_mem.force_override=always \
	$(if $(MM),--append dmirror.mm=$(subst $(space),$(comma),$(strip $(MM))))
# The debug kernel is compared with the stock kernel of the default configuration: KASAN's shadow
# alone takes an eighth of the guest's memory (mremap_test's 2 GB cases fail with ENOMEM), so there
# only its kernel reports and its completion are judged.
MM_COMPARE = $(BENCH) mm $(ROOT)/results/latest-mm $(ROOT)/results/latest-mm-stock --known $(MM_KNOWN) \
	$(if $(MM),,--fixed $(MM_FIXED) --crash-cases $(MM_CRASH) \
		$(foreach n,$(MM_CRASH_N),--crash $(ROOT)/results/latest-mm-crash-$(n))) \
	$(if $(filter debug,$(KERNEL_FLAVOUR)),--reports-only)
# The crash boots, unless MM selects programs.
MM_CRASH_BOOT = $(if $(MM),,$(MAKE) --no-print-directory stock-mm-crash;)

.PHONY: all series-check module clippy rust-analyzer kernel setup canary selftest tools guest bench \
	initramfs demo test stock stock-initramfs mm-build mm-initramfs stock-mm-initramfs check-mm stock-mm stock-mm-crash \
	mm-selftests check-dmirror check-suite check-fuzz soak soak-test reference \
	host-test \
	checkpatch compile-fail clean

all: module

setup:
	$(ROOT)/scripts/setup

kernel:
	$(ROOT)/scripts/kernel build

module: $(KERNEL_DEP)
	$(KMAKE) M=$(ROOT) modules

clippy: $(KERNEL_DEP)
	$(KMAKE) M=$(ROOT) CLIPPY=1 modules

rust-analyzer: $(KERNEL_DEP)
	$(KMAKE) M=$(ROOT) rust-analyzer

canary: $(KERNEL_DEP)
	$(KMAKE) M=$(ROOT)/tests/canary modules

selftest: $(KERNEL_DEP)
	$(ROOT)/scripts/build-selftest $(KSRC) $(KDIR) $(BUILD)/hmm-tests

tools:
	cargo build --release --quiet -p dmirror-bench

# The guest's programs, static (the initramfs has no C library): the runner of the plans
# (crates/guest), the own suite, the benchmark's guest side and the ioctl fuzzer.
GUEST_TARGET := $(ROOT)/target/x86_64-unknown-linux-gnu/release
GUEST := $(GUEST_TARGET)/dmirror-guest
SUITE := $(GUEST_TARGET)/dmirror-suite
PERF := $(GUEST_TARGET)/dmirror-perf
FUZZ := $(GUEST_TARGET)/dmirror-fuzz
guest:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet \
		--target x86_64-unknown-linux-gnu -p dmirror-guest -p dmirror-suite -p dmirror-perf -p dmirror-fuzz

# The FS-DAX cases' file system: ext4 for /dev/pmem0 (256 MiB), written there
# in the guest (busybox has no mkfs).
FSDAX_IMG := $(BUILD)/fsdax.img.gz
$(FSDAX_IMG):
	@mkdir -p $(BUILD)
	rm -f $(BUILD)/fsdax.img && truncate -s 256M $(BUILD)/fsdax.img
	/usr/sbin/mkfs.ext4 -q -F -b 4096 -E nodiscard -L fsdax $(BUILD)/fsdax.img
	gzip -1 -c $(BUILD)/fsdax.img >$@.tmp && mv $@.tmp $@ && rm -f $(BUILD)/fsdax.img

initramfs: module canary selftest guest $(FSDAX_IMG)
	$(ROOT)/scripts/mkinitramfs $(KDIR) $(BUILD)/initramfs.cpio.gz \
		$(ROOT)/dmirror.ko $(ROOT)/tests/canary/bench_canary.ko \
		$(KDIR)/lib/test_hmm.ko $(BUILD)/hmm-tests $(GUEST) $(SUITE) $(PERF) \
		$(FUZZ) $(FSDAX_IMG)

# The mm selftests for the patched kernel, and their initramfs (with upstream hmm-tests and the
# C test_hmm.ko, and the FS-DAX image for gup_longterm's files).
mm-build: $(KERNEL_DEP)
	$(ROOT)/scripts/build-mm-selftests $(KSRC) $(KDIR) $(BUILD)/mm

mm-initramfs: selftest mm-build guest $(FSDAX_IMG)
	$(ROOT)/scripts/mkinitramfs $(KDIR) $(BUILD)/mm-initramfs.cpio.gz \
		$(KDIR)/lib/test_hmm.ko $(BUILD)/hmm-tests $(BUILD)/mm $(GUEST) $(FSDAX_IMG)

# The same for the stock kernel, with the same test programs: the series' selftests (which fail
# on stock) run there too.
stock-mm-initramfs: selftest mm-build guest $(FSDAX_IMG)
	KERNEL_FLAVOUR=stock $(ROOT)/scripts/kernel build
	$(ROOT)/scripts/mkinitramfs $(STOCK_KDIR) $(STOCK_BUILD)/mm-initramfs.cpio.gz \
		$(STOCK_KDIR)/lib/test_hmm.ko $(BUILD)/hmm-tests $(BUILD)/mm $(GUEST) $(FSDAX_IMG)

host-test:
	cargo test --quiet --workspace

# The compile-fail suite: each case of tests/compile-fail is built against the kernel twice, its
# misuse must fail with the error code its header names and its control must build. The KTAP
# file goes into the patched run's summary as the gated suite `compile-fail` (make test).
COMPILE_FAIL := $(BUILD)/compile-fail
COMPILE_FAIL_RUN = $(BENCH) compile-fail --kdir $(KDIR) --cases $(ROOT)/tests/compile-fail \
	--out $(COMPILE_FAIL) --make $(MAKE) -- $(KMAKE_ARGS)
compile-fail: $(KERNEL_DEP) tools
	$(COMPILE_FAIL_RUN)

# Each patch on its own, from outside any git tree (checkpatch consults git), with --strict as
# the mm and Rust lists run it. Debian's tarball has no history, so the upstream commit ids the
# messages cite cannot be looked up. The exceptions: FILE_PATH_CHANGES (new files need no
# MAINTAINERS entry before the lists have said where they go), UNKNOWN_COMMIT_ID (no history),
# CAMELCASE (a Rust helper is named rust_helper_ and the C function it wraps: PageHead, PageTail).
checkpatch: $(KERNEL_DEP)
	@cd /tmp && rc=0 && for p in $(filter-out %/0000-cover-letter.patch,$(wildcard $(ROOT)/patches/*.patch)); do \
		echo "$$(basename "$$p"):"; \
		$(KSRC)/scripts/checkpatch.pl --no-tree --strict --quiet \
			--ignore FILE_PATH_CHANGES,UNKNOWN_COMMIT_ID,CAMELCASE "$$p" || rc=1; \
	done; exit $$rc

# Bisectability: `git am` of the series on a fresh tree, a build after each patch
# (scripts/series-check; SERIES_CHECK=quick builds only what each patch touches). Not part of
# `make test`: a cold run takes long.
SERIES_CHECK ?= full
series-check: $(KERNEL_DEP)
	$(ROOT)/scripts/series-check $(SERIES_CHECK)

demo: initramfs tools
	$(call boot,demo)

# The compile-fail cases, every suite on the patched kernel (with the compile-fail results
# merged in), then the regression cases on the stock kernel, the KCIDB export of both runs
# (kcidb.json in the patched run's results; KCIDB_URL=<where results/ is published> adds
# links), then both columns of the regression table; fails if any of them fails.
test: host-test initramfs mm-initramfs tools
	@rc=0; \
	$(COMPILE_FAIL_RUN) || rc=1; \
	$(call boot,test,--host-ktap $(COMPILE_FAIL)/compile-fail.ktap) || rc=1; \
	$(call boot_on,mm,$(KDIR),$(BUILD)/mm-initramfs.cpio.gz,$(MM_RUN)) || rc=1; \
	$(MAKE) --no-print-directory stock || rc=1; \
	$(MAKE) --no-print-directory stock-mm || rc=1; \
	$(MM_CRASH_BOOT) \
	$(BENCH) kcidb $(ROOT)/results/latest-test --stock $(ROOT)/results/latest-stock \
		--patches $(ROOT)/patches $(if $(KCIDB_URL),--url-base $(KCIDB_URL)) || rc=1; \
	$(MM_COMPARE) || rc=1; \
	$(BENCH) regress $(ROOT)/results/latest-test $(ROOT)/results/latest-stock || rc=1; \
	exit $$rc

stock-initramfs: guest
	KERNEL_FLAVOUR=stock $(ROOT)/scripts/kernel build
	mkdir -p $(STOCK_BUILD)/module
	cp -a $(ROOT)/Kbuild $(ROOT)/src $(STOCK_BUILD)/module/
	$(MAKE) -C $(STOCK_KDIR) $(KMAKE_ARGS) M=$(STOCK_BUILD)/module modules
	$(ROOT)/scripts/mkinitramfs $(STOCK_KDIR) $(STOCK_BUILD)/initramfs.cpio.gz \
		$(STOCK_BUILD)/module/dmirror.ko $(GUEST) $(SUITE)

# The regression cases alone on the stock kernel (their results there show the bugs).
stock: stock-initramfs tools
	$(call boot_on,stock,$(STOCK_KDIR),$(STOCK_BUILD)/initramfs.cpio.gz,--timeout 900 $(REUSE) \
		$(if $(SEED),--append dmirror.seed=$(SEED)))

# The mm selftests on the patched kernel alone (MM="NAME ..." filters them), on the stock kernel
# alone, and both then side by side (the table goes into the patched run's results).
check-mm: mm-initramfs tools
	$(call boot_on,mm,$(KDIR),$(BUILD)/mm-initramfs.cpio.gz,$(MM_RUN))

stock-mm: stock-mm-initramfs tools
	$(call boot_on,mm-stock,$(STOCK_KDIR),$(STOCK_BUILD)/mm-initramfs.cpio.gz,$(MM_RUN) \
		--append dmirror.crash=$(subst $(space),$(comma),$(MM_CRASH_CASES)))

# The stock kernel's crash boots: the series' selftests that take it down (MM_CRASH), one a boot.
# Each boot is meant to end in a panic, so its own verdict is not the judge; `dmirror-bench mm
# --crash` is.
stock-mm-crash: stock-mm-initramfs tools
	@n=0; for c in $(MM_CRASH_CASES); do \
		n=$$((n + 1)); \
		log=$(STOCK_BUILD)/mm-crash-$$n.log; \
		$(call boot_on,mm-crash-$$n,$(STOCK_KDIR),$(STOCK_BUILD)/mm-initramfs.cpio.gz,--timeout 300 \
			--append dmirror.suite_timeout=240 --append oops=panic --append panic_on_warn=1 \
			--append dmirror.crash=$$c) >$$log 2>&1; \
		echo "stock-mm-crash: boot $$n ($$(sed -n 's/^bench: results in //p' $$log)): meant to crash, judged by the mm-selftests comparison; its output: $$log"; \
	done

mm-selftests: mm-initramfs stock-mm-initramfs tools
	@rc=0; \
	$(MAKE) --no-print-directory check-mm || rc=1; \
	$(MAKE) --no-print-directory stock-mm || rc=1; \
	$(MM_CRASH_BOOT) \
	$(MM_COMPARE) || rc=1; \
	exit $$rc

# The benchmark: one boot, both drivers; the report goes to results/<run>/bench/.
# PERF_ARGS="--reps 3 --sizes 2,32" for a shorter run (passed with ~ for spaces).
PERF_ARGS ?=
bench: initramfs tools
	$(call boot,bench,--append dmirror.suite_timeout=3600 \
		$(if $(PERF_ARGS),--append dmirror.perf=$(subst $(space),~,$(strip $(PERF_ARGS)))))

# SUITE_ARGS="-t NAME" filters the own suite, FUZZ_ARGS sets the fuzzer's arguments.
SUITE_APPEND = $(if $(SUITE_ARGS),--append dmirror.suite=$(subst $(space),$(comma),$(strip $(SUITE_ARGS))))
FUZZ_APPEND = $(if $(FUZZ_ARGS),--append dmirror.fuzz=$(subst $(space),$(comma),$(strip $(FUZZ_ARGS))))

# For iterating on the driver: its suites only; HMM="-t NAME ..." filters hmm-tests.
check-dmirror: initramfs tools
	$(call boot,dmirror,$(if $(HMM),--append dmirror.hmm=$(subst $(space),$(comma),$(strip $(HMM)))) \
		$(SUITE_APPEND) $(FUZZ_APPEND))

# The own suite alone; SUITE_ARGS="-t NAME" filters it, SEED=N replays a seed.
check-suite: initramfs tools
	$(call boot,suite,$(SUITE_APPEND))

# The ioctl fuzzer alone; FUZZ_ARGS="--calls 300000 --threads 4" sets its arguments, SEED=N
# replays a seed.
check-fuzz: initramfs tools
	$(call boot,fuzz,$(FUZZ_APPEND))

# The patched kernel's gated plan RUNS times in a row (default 10), one boot each: each run's
# verdict, then the count; fails if any run failed. Each run's output goes to
# $(BUILD)/soak-test-N.log, its results to results/ as usual.
RUNS ?= 10
soak-test: initramfs tools
	@fail=0; for i in $$(seq 1 $(RUNS)); do \
		log=$(BUILD)/soak-test-$$i.log; \
		if $(call boot,test) >$$log 2>&1; then \
			echo "soak-test: run $$i of $(RUNS): PASS, $$(grep -E '^[0-9]+ passed' $$log | tail -n 1)"; \
		else \
			fail=$$((fail + 1)); \
			echo "soak-test: run $$i of $(RUNS): FAIL, $$(grep -E '^[0-9]+ passed' $$log | tail -n 1) (see $$log)"; \
		fi; \
	done; \
	echo "soak-test: $$(($(RUNS) - fail)) of $(RUNS) runs green"; \
	[ $$fail -eq 0 ]

# Upstream hmm-tests against the C test_hmm.ko, not gated: the reference's figures
# (docs/testing.md, "The C reference"). Not part of `make test`.
reference: initramfs tools
	$(call boot,reference)

# Load, use, unload cycles (CYCLES, default 200), then the kmemleak scan; meant for
# KERNEL_FLAVOUR=debug, whose `make test` runs it too.
CYCLES ?=
soak: initramfs tools
	$(call boot,soak,$(if $(CYCLES),--append dmirror.cycles=$(CYCLES)))

clean:
	-$(KMAKE) M=$(ROOT) clean
	-$(KMAKE) M=$(ROOT)/tests/canary clean
	rm -rf $(ROOT)/build
