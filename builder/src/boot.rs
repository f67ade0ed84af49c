//! What boots an image: the initramfs (`initramfs`), the unified kernel image (`pe`), the
//! Raspberry Pi's boot files (`rpi`), and QEMU playing UEFI or the Pi firmware (`qemu`).

pub mod initramfs;
pub mod pe;
pub mod qemu;
pub mod rpi;
