//! The guest's memory layout, which the host runner puts on the kernel command line and the
//! guest programs rely on: the RAM, two legacy pmem regions and the reserved range of the
//! coherent devices (docs/driver.md, "Module parameters").

/// The guest's RAM, in MiB.
pub const GUEST_MEM_MIB: u64 = 3072;

/// The legacy pmem regions (`memmap=SIZE!START`): `/dev/pmem0` for FS-DAX, `/dev/pmem1` for
/// O_DIRECT and device-DAX, with RAM between them to keep them apart, as (base, size) in bytes.
pub const PMEM: [(u64, u64); 2] = [(0x4000_0000, 256 << 20), (0x5800_0000, 128 << 20)];

/// The range reserved for the coherent devices (`memmap=SIZE$START`): base and size in bytes.
pub const RESERVED: (u64, u64) = (0x6000_0000, 512 << 20);

/// Each coherent device's half of [`RESERVED`]: `/dev/hmm_dmirror2` and `/dev/hmm_dmirror3`
/// of dmirror.ko, the two coherent devices of test_hmm.ko.
pub const COHERENT: [(u64, u64); 2] = [(0x6000_0000, 256 << 20), (0x7000_0000, 256 << 20)];

const _: () = assert!(COHERENT[0].0 == RESERVED.0);
const _: () = assert!(COHERENT[1].0 + COHERENT[1].1 == RESERVED.0 + RESERVED.1);

/// The kernel command line's `memmap=` options for the layout.
pub fn memmap_args() -> Vec<String> {
    let mib = |b: u64| b >> 20;
    let mut args: Vec<String> = PMEM
        .iter()
        .map(|&(base, size)| format!("memmap={}M!{}M", mib(size), mib(base)))
        .collect();
    args.push(format!("memmap={}M${}M", mib(RESERVED.1), mib(RESERVED.0)));
    args
}

/// dmirror.ko's module parameters that give it both coherent devices.
pub fn dmirror_coherent_args() -> Vec<String> {
    COHERENT
        .iter()
        .enumerate()
        .flat_map(|(i, &(base, size))| {
            [
                format!("coherent{i}_base={base:#x}"),
                format!("coherent{i}_size={size:#x}"),
            ]
        })
        .collect()
}

/// test_hmm.ko's module parameters that give it both coherent devices.
pub fn test_hmm_coherent_args() -> Vec<String> {
    COHERENT
        .iter()
        .enumerate()
        .map(|(i, &(base, _))| format!("spm_addr_dev{i}={base:#x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_the_layout() {
        assert_eq!(
            memmap_args(),
            ["memmap=256M!1024M", "memmap=128M!1408M", "memmap=512M$1536M"]
        );
        assert_eq!(
            dmirror_coherent_args(),
            [
                "coherent0_base=0x60000000",
                "coherent0_size=0x10000000",
                "coherent1_base=0x70000000",
                "coherent1_size=0x10000000"
            ]
        );
        assert_eq!(
            test_hmm_coherent_args(),
            ["spm_addr_dev0=0x60000000", "spm_addr_dev1=0x70000000"]
        );
    }
}
