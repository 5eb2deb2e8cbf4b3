//! userfaultfd: the handful of ioctls and structures vkvm uses, bound with
//! vmm-sys-util's ioctl macros. The `userfaultfd` crate would generate them
//! with bindgen at build time, which needs libclang on every machine that
//! builds vkvm; these few definitions are checked against the kernel's
//! values in the tests below instead.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;

pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

const MODE_MISSING: u64 = 1 << 0;
const MODE_WP: u64 = 1 << 1;
const MODE_MINOR: u64 = 1 << 2;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const CONTINUE_MODE_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct uffdio_api {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct uffdio_range {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct uffdio_register {
    range: uffdio_range,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct uffdio_zeropage {
    range: uffdio_range,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
#[derive(Default)]
struct uffdio_writeprotect {
    range: uffdio_range,
    mode: u64,
}
#[repr(C)]
#[derive(Default)]
struct uffdio_continue {
    range: uffdio_range,
    mode: u64,
    mapped: i64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, uffdio_api);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, uffdio_register);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, uffdio_range);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, uffdio_zeropage);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, uffdio_writeprotect);
ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, uffdio_continue);
// /dev/userfaultfd's one ioctl: a new userfaultfd.
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// Which faults a registered range reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mode {
    pub missing: bool,
    pub write_protect: bool,
    pub minor: bool,
}

/// One event read from the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread touched `addr` (page aligned); `write` for a write access,
    /// `wp` if it hit a write-protected page, `minor` if the page is in the
    /// page cache but not mapped.
    PageFault {
        addr: u64,
        write: bool,
        wp: bool,
        minor: bool,
        tid: u32,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Other(u8),
}

/// A userfaultfd with the API handshake done.
pub struct Uffd {
    file: File,
}

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Open a userfaultfd (the syscall, else /dev/userfaultfd) and ask for
    /// `features`; fails if the kernel lacks any of them.
    pub fn new(features: u64) -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain syscall; the result is checked.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        if fd < 0 {
            let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value.
            fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW(), flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: fd is a new descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut api = uffdio_api { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: the kernel reads and writes `api`, which outlives the call.
        check(unsafe { ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) })?;
        if api.features & features != features {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("kernel lacks userfaultfd features {:#x}", features & !api.features),
            ));
        }
        Ok(Uffd { file })
    }

    pub fn register(&self, start: u64, len: u64, mode: Mode) -> io::Result<()> {
        let mut r = uffdio_register {
            range: uffdio_range { start, len },
            mode: (mode.missing as u64 * MODE_MISSING)
                | (mode.write_protect as u64 * MODE_WP)
                | (mode.minor as u64 * MODE_MINOR),
            ioctls: 0,
        };
        // SAFETY: as in new().
        check(unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut r) })
    }

    pub fn zeropage(&self, start: u64, len: u64) -> io::Result<()> {
        let mut z = uffdio_zeropage { range: uffdio_range { start, len }, mode: 0, zeropage: 0 };
        // SAFETY: as in new().
        check(unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut z) })
    }

    /// Map pages already in the page cache of a MINOR-registered shmem range.
    pub fn continue_(&self, start: u64, len: u64, write_protect: bool) -> io::Result<()> {
        let mut c = uffdio_continue {
            range: uffdio_range { start, len },
            mode: write_protect as u64 * CONTINUE_MODE_WP,
            mapped: 0,
        };
        // SAFETY: as in new().
        check(unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_CONTINUE(), &mut c) })
    }

    /// Set or clear write protection on mapped pages of a WP-registered range.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut w =
            uffdio_writeprotect { range: uffdio_range { start, len }, mode: protect as u64 * WRITEPROTECT_MODE_WP };
        // SAFETY: as in new().
        check(unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_WRITEPROTECT(), &mut w) })
    }

    /// Wake threads waiting on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let r = uffdio_range { start, len };
        // SAFETY: the kernel only reads `r`.
        check(unsafe { ioctl_with_ref(&self.file, UFFDIO_WAKE(), &r) })
    }

    /// Read pending events without blocking; Ok(0) when there are none.
    pub fn read_events(&self, out: &mut [Event]) -> io::Result<usize> {
        const MSG: usize = 32;
        let mut buf = [0u8; MSG * 16];
        let want = out.len().min(16) * MSG;
        // SAFETY: reading into a local buffer of at least `want` bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        let count = n as usize / MSG;
        for (i, slot) in out.iter_mut().enumerate().take(count) {
            *slot = decode(&buf[i * MSG..(i + 1) * MSG]);
        }
        Ok(count)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn decode(m: &[u8]) -> Event {
    let u64_at = |o: usize| u64::from_le_bytes(m[o..o + 8].try_into().unwrap_or([0; 8]));
    match m[0] {
        EVENT_PAGEFAULT => {
            let flags = u64_at(8);
            Event::PageFault {
                addr: u64_at(16) & !0xfff,
                write: flags & PAGEFAULT_FLAG_WRITE != 0,
                wp: flags & PAGEFAULT_FLAG_WP != 0,
                minor: flags & PAGEFAULT_FLAG_MINOR != 0,
                // With UFFD_FEATURE_THREAD_ID: the faulting thread.
                tid: u32::from_le_bytes(m[24..28].try_into().unwrap_or([0; 4])),
            }
        }
        EVENT_REMOVE => Event::Remove { start: u64_at(8), end: u64_at(16) },
        EVENT_UNMAP => Event::Unmap { start: u64_at(8), end: u64_at(16) },
        other => Event::Other(other),
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values printed from <linux/userfaultfd.h> with gcc on a 6.x kernel.
        assert_eq!(UFFDIO_API(), 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020aa00);
        assert_eq!(UFFDIO_WAKE(), 0x8010aa02);
        assert_eq!(UFFDIO_ZEROPAGE(), 0xc020aa04);
        assert_eq!(UFFDIO_WRITEPROTECT(), 0xc018aa06);
        assert_eq!(UFFDIO_CONTINUE(), 0xc020aa07);
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xaa00);
        assert_eq!(std::mem::size_of::<uffdio_zeropage>(), 32);
        assert_eq!(std::mem::size_of::<uffdio_register>(), 32);
    }

    struct Shm {
        fd: File,
        addr: *mut u8,
        len: usize,
    }
    impl Drop for Shm {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping.
            unsafe { libc::munmap(self.addr.cast(), self.len) };
        }
    }
    fn shm(pages: usize) -> Shm {
        let len = pages * 4096;
        // SAFETY: plain syscalls, results checked.
        unsafe {
            let fd = libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as i64), 0);
            let p = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0);
            assert_ne!(p, libc::MAP_FAILED);
            Shm { fd: File::from_raw_fd(fd), addr: p.cast(), len }
        }
    }

    /// Serve events on `u` until `stop`, resolving each with `f`.
    fn serve(
        u: Arc<Uffd>,
        stop: Arc<AtomicBool>,
        f: impl Fn(&Uffd, Event) + Send + 'static,
    ) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut n = 0;
            let mut ev = [Event::Other(0); 8];
            while !stop.load(Ordering::Relaxed) {
                let k = u.read_events(&mut ev).unwrap();
                for &e in &ev[..k] {
                    f(&u, e);
                    n += 1;
                }
                std::thread::yield_now();
            }
            n
        })
    }

    #[test]
    fn missing_fault_on_shmem_is_resolved_by_zeropage() {
        let Ok(u) = Uffd::new(FEATURE_MISSING_SHMEM) else {
            panic!("userfaultfd unavailable (needs root or vm.unprivileged_userfaultfd=1)");
        };
        let m = shm(4);
        u.register(m.addr as u64, m.len as u64, Mode { missing: true, ..Mode::default() }).unwrap();
        let u = Arc::new(u);
        let stop = Arc::new(AtomicBool::new(false));
        let h = serve(u.clone(), stop.clone(), |u, e| {
            if let Event::PageFault { addr, .. } = e {
                u.zeropage(addr, 4096).unwrap();
            }
        });
        // SAFETY: reading our own mapping; the handler supplies the page.
        let v = unsafe {
            m.addr.add(4096 + 7).write_volatile(0x5a);
            m.addr.add(4096 + 7).read_volatile()
        };
        stop.store(true, Ordering::Relaxed);
        assert_eq!(v, 0x5a);
        assert_eq!(h.join().unwrap(), 1);
        let _ = &m.fd;
    }

    #[test]
    fn minor_and_write_protect_faults_reach_the_handler() {
        let u = Uffd::new(
            FEATURE_MISSING_SHMEM | FEATURE_MINOR_SHMEM | FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM,
        )
        .expect("userfaultfd with minor and write-protect faults on shmem");
        let m = shm(2);
        // Populate page 0 in the page cache through a second, unregistered view.
        // SAFETY: mapping and writing our own memfd.
        unsafe {
            let q = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                m.fd.as_raw_fd(),
                0,
            );
            assert_ne!(q, libc::MAP_FAILED);
            (q as *mut u8).write_volatile(0x11);
            libc::munmap(q, 4096);
        }
        let mode = Mode { missing: true, write_protect: true, minor: true };
        u.register(m.addr as u64, m.len as u64, mode).unwrap();
        let u = Arc::new(u);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let h = serve(u.clone(), stop.clone(), move |u, e| {
            s2.lock().unwrap().push(e);
            if let Event::PageFault { addr, wp, minor, .. } = e {
                if minor {
                    u.continue_(addr, 4096, true).unwrap(); // map it write-protected
                } else if wp {
                    u.write_protect(addr, 4096, false).unwrap();
                }
            }
        });
        // SAFETY: our own mapping; the handler resolves each fault.
        unsafe {
            assert_eq!(m.addr.read_volatile(), 0x11); // minor fault, mapped WP
            m.addr.write_volatile(0x22); // write-protect fault
            assert_eq!(m.addr.read_volatile(), 0x22);
        }
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        let ev = seen.lock().unwrap().clone();
        let a = m.addr as u64;
        assert!(
            ev.iter().any(
                |e| matches!(e, Event::PageFault { addr, write: false, wp: false, minor: true, .. } if *addr == a)
            ),
            "{ev:?}"
        );
        assert!(ev.iter().any(|e| matches!(e, Event::PageFault { addr, wp: true, .. } if *addr == a)), "{ev:?}");
    }
}
