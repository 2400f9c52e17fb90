//! Kernel ABI pieces that the libc crate lacks, under their kernel header names.
//!
//! Everything here mirrors a uapi header byte for byte; keep it that way.

/// elf.h: the extended processor state regset (XSAVE layout).
pub const NT_X86_XSTATE: libc::c_int = 0x202;
/// ptrace.h (6.3+).
pub const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// asm/prctl.h: map the vDSO at an address (used when an image has none to move).
pub const ARCH_MAP_VDSO_64: libc::c_int = 0x2003;
/// prctl.h.
pub const PR_SET_MM: libc::c_int = 35;
pub const PR_SET_MM_MAP: libc::c_ulong = 14;
pub const PR_GET_TID_ADDRESS: libc::c_int = 40;
/// asm-generic/resource.h: number of resource limits.
pub const RLIMIT_NLIMITS: u32 = 16;
/// rseq.h.
pub const RSEQ_FLAG_UNREGISTER: libc::c_int = 1;
/// mman-common.h (6.13+): make pages guard pages (any access faults).
pub const MADV_GUARD_INSTALL: u64 = 102;
/// mman.h (4.17+).
pub const MAP_FIXED_NOREPLACE: libc::c_int = 0x100000;
/// Errno values the kernel uses to ask for a syscall restart; never seen by
/// user space unless a tracer looks at a thread stopped inside a syscall.
pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;
pub const ERESTART_RESTARTBLOCK: i64 = 516;

/// linux/ptrace.h: struct ptrace_rseq_configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PtraceRseqConfiguration {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// linux/prctl.h: struct prctl_mm_map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

/// linux/sched.h: struct clone_args (the fields up to set_tid_size).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
}

/// asm/signal.h (x86_64): the kernel's struct sigaction, not glibc's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelSigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// linux/capability.h, version 3.
pub const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapUserHeader {
    pub version: u32,
    pub pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapUserData {
    pub effective: u32,
    pub permitted: u32,
    pub inheritable: u32,
}

/// Views a plain-old-data struct as bytes, to copy it into a target.
pub fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a repr(C) POD type from this module; any byte view is valid.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// asm-generic/fcntl.h: signal-driven I/O owners and signals.
pub const F_SETSIG: libc::c_int = 10;
pub const F_GETSIG: libc::c_int = 11;
pub const F_SETOWN_EX: libc::c_int = 15;
pub const F_GETOWN_EX: libc::c_int = 16;
/// struct f_owner_ex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FOwnerEx {
    pub type_: i32,
    pub pid: i32,
}
