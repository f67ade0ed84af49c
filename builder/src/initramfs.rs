//! The initramfs, built on the host from the files of the bootstrapped target tree, without
//! running any code of the target's architecture. The building blocks: ELF headers ([`elf`]),
//! the newc cpio format ([`cpio`]) and depmod's module index ([`kmod`]).

pub mod cpio;
pub mod elf;
pub mod kmod;

pub use elf::ElfInfo;
