//! PCI configuration space through the legacy port mechanism (#1: the address at
//! port 0xCF8, the data at 0xCFC), bus enumeration, and the
//! [`ConfigurationAccess`] that `virtio-drivers` uses to reach a device.
//!
//! Enumeration starts at bus 0 and follows PCI-to-PCI bridges to the buses
//! the firmware numbered behind them (their secondary bus number), instead
//! of probing all 256 buses: under TCG each probe is a trapped port access,
//! and the blind sweep cost ~30 ms of the boot.

use virtio_drivers::transport::pci::bus::{
    ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, HeaderType, PciRoot,
};

use crate::port::{inl, outl};

/// CONFIG_ADDRESS.
const CONFIG_ADDRESS: u16 = 0xCF8;
/// CONFIG_DATA.
const CONFIG_DATA: u16 = 0xCFC;

/// Configuration access through ports 0xCF8/0xCFC. Holds no state; the kernel is
/// single-threaded with interrupts off, so an address/data pair is never split.
#[derive(Debug)]
pub struct PortCam;

fn address(df: DeviceFunction, offset: u8) -> u32 {
    1 << 31
        | u32::from(df.bus) << 16
        | u32::from(df.device & 0x1f) << 11
        | u32::from(df.function & 0x7) << 8
        | u32::from(offset & 0xfc)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        // SAFETY: 0xCF8/0xCFC are the PC's PCI configuration mechanism #1: writing
        // an address with the enable bit then reading the data port reads that
        // dword of configuration space, with no other effect.
        unsafe {
            outl(CONFIG_ADDRESS, address(df, offset));
            inl(CONFIG_DATA)
        }
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: as for `read_word`; the caller (`virtio-drivers`, or this
        // kernel) writes only registers it means to (command, BARs).
        unsafe {
            outl(CONFIG_ADDRESS, address(df, offset));
            outl(CONFIG_DATA, data);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// The PCI root over port configuration access.
pub fn root() -> PciRoot<PortCam> {
    PciRoot::new(PortCam)
}

/// Offset of the bridge's bus numbers (primary, secondary, subordinate) in a
/// type 1 header.
const BRIDGE_BUS_NUMBERS: u8 = 0x18;

/// Every function on bus 0 and on the buses behind its bridges
/// (depth first), passed to `f`.
pub fn for_each_function(
    root: &PciRoot<PortCam>,
    mut f: impl FnMut(DeviceFunction, &DeviceFunctionInfo),
) {
    // Buses to visit; each bus at most once (a misprogrammed bridge must not
    // make a loop).
    let mut visited = [false; 256];
    let mut pending = [0u8; 256];
    let mut top = 1; // pending[0] = bus 0
    while top > 0 {
        top -= 1;
        let bus = pending[top];
        if core::mem::replace(&mut visited[usize::from(bus)], true) {
            continue;
        }
        for (df, info) in root.enumerate_bus(bus) {
            f(df, &info);
            if info.header_type == HeaderType::PciPciBridge {
                let secondary = (PortCam.read_word(df, BRIDGE_BUS_NUMBERS) >> 8) as u8;
                if secondary != 0 && !visited[usize::from(secondary)] && top < pending.len() {
                    pending[top] = secondary;
                    top += 1;
                }
            }
        }
    }
}
