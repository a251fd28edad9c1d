//! The shared segment: an anonymous memory file mapped by every rank, and the
//! rendezvous that hands its descriptor from rank 0 to the others.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::ptr::NonNull;
use std::time::Duration;

use sheaf_core::Deadline;

/// A shared mapping of a memory file; unmapped on drop.
pub struct Segment {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; all access to it goes through atomics
// or through byte ranges that the ring protocol hands to one side at a time.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Segment {
    /// A new zero-filled memory file of `len` bytes, mapped. Pages are allocated only
    /// when first touched.
    pub fn create(len: usize) -> io::Result<Segment> {
        // SAFETY: a NUL-terminated name; the flags are valid.
        let fd = unsafe { libc::memfd_create(c"sheaf-shm".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and is owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Segment::map(fd, len)
    }

    /// Maps a memory file received from rank 0, checking that it is as long as promised.
    pub fn open(fd: OwnedFd, len: usize) -> io::Result<Segment> {
        // SAFETY: fstat into a zeroed struct on a descriptor we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_size as u64) < len as u64 {
            return Err(io::Error::other(format!(
                "the shared segment is {} bytes, rank 0 announced {len}",
                st.st_size
            )));
        }
        Segment::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Segment> {
        // SAFETY: a fresh shared mapping of a file we hold open; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Segment { ptr, len, fd })
    }

    /// Faults in the pages of `range` now (`MADV_POPULATE_WRITE`, without touching
    /// their contents), so that the first messages do not pay a page fault per 4 KiB.
    /// Best effort: older kernels lack it, and then the first pass is slower.
    pub fn prefault(&self, range: std::ops::Range<usize>) {
        debug_assert!(range.end <= self.len);
        // SAFETY: advice on pages inside our own mapping; it does not change contents.
        unsafe {
            libc::madvise(self.ptr.as_ptr().add(range.start).cast(), range.len(), libc::MADV_POPULATE_WRITE);
        }
    }

    pub fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; nothing borrows it past `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The abstract socket (no file) rank 0 hands the segment out on: one per user and
/// rendezvous port, like the TCP port of the other transports.
pub fn socket_name(port: u16) -> String {
    // SAFETY: getuid cannot fail.
    format!("sheaf-shm-{}-{port}", unsafe { libc::getuid() })
}

pub fn listen(name: &str) -> io::Result<UnixListener> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts one connection, polling until `deadline`.
pub fn accept(listener: &UnixListener, deadline: Deadline) -> io::Result<Option<UnixStream>> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(Some(stream));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if deadline.expired() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to rank 0's socket, retrying while it is not listening yet.
pub fn connect(name: &str, deadline: Deadline) -> io::Result<UnixStream> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    loop {
        match UnixStream::connect_addr(&addr) {
            Ok(s) => return Ok(s),
            Err(e) if deadline.expired() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

pub fn write_all(stream: &mut UnixStream, bytes: &[u8], deadline: Deadline) -> io::Result<()> {
    stream.set_write_timeout(Some(deadline.remaining().max(Duration::from_millis(1))))?;
    stream.write_all(bytes)
}

pub fn read_exact(stream: &mut UnixStream, buf: &mut [u8], deadline: Deadline) -> io::Result<()> {
    stream.set_read_timeout(Some(deadline.remaining().max(Duration::from_millis(1))))?;
    stream.read_exact(buf)
}

/// Sends `bytes` with `fd` attached (`SCM_RIGHTS`).
pub fn send_fd(stream: &UnixStream, fd: RawFd, bytes: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr pointing at live buffers for the duration of the call;
    // the control buffer is CMSG_SPACE bytes, enough for one descriptor.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        if libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) != bytes.len() as isize {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and the descriptor sent with them, if any.
pub fn recv_fd(
    stream: &UnixStream,
    buf: &mut [u8],
    deadline: Deadline,
) -> io::Result<(usize, Option<OwnedFd>)> {
    stream.set_read_timeout(Some(deadline.remaining().max(Duration::from_millis(1))))?;
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as in `send_fd`; the kernel writes at most `space` control bytes.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fd = None;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null() && (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            let raw = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
            fd = Some(OwnedFd::from_raw_fd(raw));
        }
        Ok((n as usize, fd))
    }
}

/// Whether process `pid` is still running (not gone, not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold
        // anything, so look after the last ')'.
        Ok(stat) => match stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next()) {
            Some('Z' | 'X' | 'x') => false,
            Some(_) => true,
            None => true,
        },
        Err(_) => false,
    }
}

/// Sleeps on `word` while it still holds `expected`, at most `timeout` (futex wait on
/// shared memory, so other processes can wake it).
pub fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 behind `word` and sleeps; the timespec
    // lives across the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every process sleeping on `word`.
pub fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: FUTEX_WAKE on an aligned u32 in a mapping shared with the sleepers.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}
