//! The boot-info structure, version 1: the one definition shared by the
//! firmware (`firmware/src/bootinfo.rs`) and the VMM
//! (`vmm/src/boot/firmware.rs` includes this file).
//!
//! vkvm writes it at [`BOOT_INFO_ADDR`] in guest RAM before the first vCPU
//! runs; the firmware reads it in 32-bit protected mode, checks it, and
//! enters the guest's PVH entry with `ebx` = `start_info`. All fields are
//! little-endian:
//!
//! | offset | size | field      | value                                        |
//! |--------|------|------------|----------------------------------------------|
//! | 0      | 4    | magic      | [`BOOT_INFO_MAGIC`] ("VKBI")                 |
//! | 4      | 2    | version    | [`BOOT_INFO_VERSION`]                        |
//! | 6      | 2    | size       | [`BOOT_INFO_SIZE`] (bytes, whole structure)  |
//! | 8      | 4    | checksum   | makes the sum of all 32-bit words 0 (mod 2^32) |
//! | 12     | 4    | reserved   | 0                                            |
//! | 16     | 8    | pvh_entry  | guest-physical PVH entry, nonzero, < 4 GiB   |
//! | 24     | 8    | start_info | guest-physical `hvm_start_info`, < 4 GiB     |
#![allow(dead_code)]

/// Guest-physical address of the structure: low RAM that the PVH boot
/// (start info 0x6000, memory map 0x7000, command line 0x20000) leaves free.
pub const BOOT_INFO_ADDR: u64 = 0x5000;
/// "VKBI", read as a little-endian u32.
pub const BOOT_INFO_MAGIC: u32 = 0x4942_4b56;
pub const BOOT_INFO_VERSION: u16 = 1;
pub const BOOT_INFO_SIZE: u16 = 32;

/// The ROM: 64 KiB ending at 4 GiB, so the reset vector 0xFFFFFFF0 is in it.
pub const ROM_BASE: u64 = 0xFFFF_0000;
pub const ROM_SIZE: u64 = 0x1_0000;

/// Firmware error port: after printing its message, the BSP writes the
/// message's guest-physical address (inside the ROM) here as a 32-bit `out`,
/// and vkvm stops with status 3 and that message as its error.
pub const ERROR_PORT: u16 = 0x0610;

/// Every message the firmware prints on COM1 before it halts starts with
/// this; vkvm turns such a line into its crash error.
pub const ERROR_PREFIX: &str = "vkvm-firmware: ";
