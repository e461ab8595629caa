//! The network: the virtio-net NIC (driven by `virtio-drivers` over its PCI
//! transport) as a `smoltcp` device, DHCP on it, and TCP sockets for the
//! link to the control plane ([`Net`]).
//!
//! The NIC's interrupts are not used: DHCP busy-polls, bounded by a deadline
//! on the TSC clock; the link ([`crate::link`]) polls with `hlt` between polls,
//! woken by the 1 kHz timer tick. The DHCP socket stays in the socket set
//! after the lease, so [`Net::poll`] renews it (and reports a change).

use alloc::alloc::{alloc_zeroed, dealloc, Layout};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::hint::spin_loop;
use core::ptr::NonNull;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};
use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::pci::bus::{Command, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::pci::PortCam;
use crate::{kprintln, tsc, MMIO_LIMIT};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// virtio-net: transitional (legacy + modern) and modern-only device IDs.
pub const VIRTIO_NET_DEVICES: [u16; 2] = [0x1000, 0x1041];

/// Descriptors per virtqueue.
const QUEUE_SIZE: usize = 16;
/// Receive buffer size: an Ethernet frame plus the virtio-net header.
const RX_BUF_LEN: usize = 2048;
/// Largest frame smoltcp may send (Ethernet header + 1500 bytes of IP).
const MTU: usize = 1514;

/// The `virtio-drivers` HAL for this kernel: physical == virtual (identity map),
/// DMA buffers come from the heap, page-aligned.
#[derive(Debug)]
pub struct KernelHal;

fn dma_layout(pages: usize) -> Layout {
    // PAGE_SIZE is a power of two and `pages` is small: this cannot fail.
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("DMA layout")
}

// SAFETY: DMA memory comes zeroed from the global allocator and stays allocated
// until `dma_dealloc`; addresses are identity-mapped (heap and stacks lie below
// 1 GiB, MMIO below MMIO_LIMIT), so the physical address handed to the device is
// the address the driver uses, and x86 DMA is cache-coherent (no flushing).
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: the layout has a non-zero size (`pages` >= 1 in virtio-drivers).
        let ptr = unsafe { alloc_zeroed(dma_layout(pages.max(1))) };
        match NonNull::new(ptr) {
            Some(p) => (ptr as u64, p),
            // virtio-drivers turns paddr 0 into Error::DmaError.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: `vaddr` came from `dma_alloc` with the same page count.
        unsafe { dealloc(vaddr.as_ptr(), dma_layout(pages.max(1))) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let end = paddr.saturating_add(size as u64);
        assert!(
            paddr != 0 && end <= MMIO_LIMIT,
            "MMIO region {paddr:#x}+{size:#x} outside the identity map"
        );
        NonNull::new(paddr as *mut u8).expect("non-zero MMIO address")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

type Nic = VirtIONet<KernelHal, PciTransport, QUEUE_SIZE>;

/// The NIC as a `smoltcp` device. The driver sits in a `RefCell` because a
/// receive hands out two tokens (receive, and transmit for the reply) that both
/// need it.
pub struct NetDevice {
    nic: RefCell<Nic>,
}

impl core::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("NetDevice")
    }
}

impl NetDevice {
    /// Bring up the virtio-net function `df`: enable its memory space and bus
    /// mastering, then let `virtio-drivers` negotiate and fill the receive queue.
    /// A legacy-only (virtio 0.9.5) device is refused by the transport: it needs
    /// the virtio 1.0 PCI capabilities (QEMU's default transitional device has
    /// them).
    pub fn new(root: &mut PciRoot<PortCam>, df: DeviceFunction) -> Result<Self, String> {
        let (_, command) = root.get_status_command(df);
        root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
        let transport = PciTransport::new::<KernelHal, _>(root, df)
            .map_err(|e| format!("PCI transport: {e}"))?;
        let nic = Nic::new(transport, RX_BUF_LEN).map_err(|e| format!("initialisation: {e}"))?;
        Ok(NetDevice {
            nic: RefCell::new(nic),
        })
    }

    /// The NIC's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.nic.borrow().mac_address()
    }
}

/// A received frame; its buffer goes back to the NIC after use.
pub struct RxToken<'a> {
    nic: &'a RefCell<Nic>,
    buf: Option<virtio_drivers::device::net::RxBuffer>,
}

/// Permission to send one frame.
pub struct TxToken<'a> {
    nic: &'a RefCell<Nic>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        let buf = self.buf.take().expect("RxToken consumed once");
        let r = f(buf.packet());
        // A failure here loses one receive buffer; nothing better to do.
        let _ = self.nic.borrow_mut().recycle_rx_buffer(buf);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut nic = self.nic.borrow_mut();
        let mut tx = nic.new_tx_buffer(len);
        let r = f(tx.packet_mut());
        // A lost frame is for the protocols above to retransmit.
        let _ = nic.send(tx);
        r
    }
}

impl Device for NetDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buf = self.nic.borrow_mut().receive().ok()?;
        Some((
            RxToken {
                nic: &self.nic,
                buf: Some(buf),
            },
            TxToken { nic: &self.nic },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.nic.borrow().can_send() {
            Some(TxToken { nic: &self.nic })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        // Caps the TCP receive window at this many segments: as many as the
        // receive queue has buffers (when they are all full QEMU holds
        // further frames back rather than dropping them).
        caps.max_burst_size = Some(QUEUE_SIZE);
        caps
    }
}

/// The smoltcp clock: microseconds since boot on the TSC.
pub fn now() -> Instant {
    Instant::from_micros(tsc::micros_since_boot() as i64)
}

/// An IPv4 lease.
#[derive(Clone, Copy, Debug)]
pub struct Lease {
    /// Address and prefix length.
    pub address: Ipv4Cidr,
    /// Default gateway, if the server named one.
    pub router: Option<Ipv4Address>,
}

/// TCP buffer sizes of a link socket: a join answer is a few KiB, a sync
/// usually less; work that carries modules streams through (the link reads
/// the socket at least every millisecond).
const TCP_BUFFER: usize = 32 * 1024;

/// The configured network: the NIC, the interface with its lease, and the
/// sockets (DHCP, and the link's TCP sockets).
pub struct Net {
    dev: NetDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    dhcp: SocketHandle,
    lease: Lease,
}

impl core::fmt::Debug for Net {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Net")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

fn configure(iface: &mut Interface, cfg: &dhcpv4::Config<'_>) {
    iface.update_ip_addrs(|addrs| {
        addrs.clear();
        // One address fits the vector's capacity.
        let _ = addrs.push(IpCidr::Ipv4(cfg.address));
    });
    iface.routes_mut().remove_default_ipv4_route();
    if let Some(router) = cfg.router {
        // Only fails when the route table is full; it is empty.
        let _ = iface.routes_mut().add_default_ipv4_route(router);
    }
}

/// Run DHCP on `dev` until a lease is configured or `timeout` passes (busy
/// polling). On success the interface carries the address and default route.
pub fn dhcp(mut dev: NetDevice, timeout: Duration) -> Option<Net> {
    let mac = EthernetAddress(dev.mac());
    let mut config = Config::new(HardwareAddress::Ethernet(mac));
    config.random_seed = tsc::rdtsc();
    let mut iface = Interface::new(config, &mut dev, now());
    let mut sockets = SocketSet::new(Vec::new());
    let handle = sockets.add(dhcpv4::Socket::new());
    let deadline = now() + timeout;
    while now() < deadline {
        iface.poll(now(), &mut dev, &mut sockets);
        if let Some(dhcpv4::Event::Configured(cfg)) =
            sockets.get_mut::<dhcpv4::Socket>(handle).poll()
        {
            let lease = Lease {
                address: cfg.address,
                router: cfg.router,
            };
            configure(&mut iface, &cfg);
            return Some(Net {
                dev,
                iface,
                sockets,
                dhcp: handle,
                lease,
            });
        }
        spin_loop();
    }
    None
}

impl Net {
    /// The NIC's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.dev.mac()
    }

    /// The current lease.
    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// Moves packets: receive, run the sockets' timers, transmit; keeps the
    /// DHCP lease (renewals, a new address, a lost lease are reported).
    pub fn poll(&mut self) {
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
        match self.sockets.get_mut::<dhcpv4::Socket>(self.dhcp).poll() {
            Some(dhcpv4::Event::Configured(cfg)) => {
                if cfg.address != self.lease.address || cfg.router != self.lease.router {
                    kprintln!("net: dhcp: new lease {}", cfg.address);
                }
                self.lease = Lease {
                    address: cfg.address,
                    router: cfg.router,
                };
                configure(&mut self.iface, &cfg);
            }
            Some(dhcpv4::Event::Deconfigured) => {
                kprintln!("net: dhcp: lease {} lost; asking again", self.lease.address);
                self.iface.update_ip_addrs(|a| a.clear());
                self.iface.routes_mut().remove_default_ipv4_route();
            }
            None => {}
        }
    }

    /// A new TCP socket connecting from `local_port` to `remote`
    /// (the SYN goes out at the next [`poll`](Self::poll)).
    pub fn tcp_connect(
        &mut self,
        remote: (Ipv4Address, u16),
        local_port: u16,
    ) -> Result<SocketHandle, tcp::ConnectError> {
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(alloc::vec![0; TCP_BUFFER]),
            tcp::SocketBuffer::new(alloc::vec![0; TCP_BUFFER]),
        );
        // Acknowledge at once: the server's flights are small and the poll
        // loop is tick-driven, a delayed ACK would only add latency.
        sock.set_ack_delay(None);
        sock.set_nagle_enabled(false);
        sock.connect(self.iface.context(), remote, local_port)?;
        Ok(self.sockets.add(sock))
    }

    /// The TCP socket `h`.
    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Drops the TCP socket `h` (abort it first, or close it and poll, to tell
    /// the peer).
    pub fn remove(&mut self, h: SocketHandle) {
        self.sockets.remove(h);
    }
}
