//! Transports written against the C ABI of `include/sheaf_transport.h`, loaded with
//! `libloading` and adapted to [`Link`], so that every collective, algorithm and law
//! runs over them as over the Rust transports.
//!
//! A library is a C transport when it exports `sheaf_transport_plugin_v1`. Versions
//! to come add `sheaf_transport_plugin_v2` and so on: [`load`] asks for the newest
//! symbol it knows first and adapts older tables, so a library built against version 1
//! keeps loading.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sheaf_core::{check_link_peer, CommError, DType, Deadline, Link, Op, ReduceOp, Tag};

use crate::LoadError;

/// `SHEAF_TRANSPORT_VERSION` of the header this host was built with.
pub const C_TRANSPORT_VERSION: u32 = 1;
/// The symbol of version 1.
const SYMBOL_V1: &[u8] = b"sheaf_transport_plugin_v1";

const OK: i32 = 0;
const TIMEOUT: i32 = 1;
const PEER_FAILED: i32 = 2;
const ABORTED: i32 = 3;
const PROTOCOL: i32 = 4;
const INVALID: i32 = 5;
const CLOSED: i32 = 6;
const TRUNCATED: i32 = 7;

/// `sheaf_status`.
#[repr(C)]
struct Status {
    code: i32,
    rank: u32,
    needed: u64,
    message: [c_char; 256],
}

impl Status {
    fn new() -> Status {
        Status { code: OK, rank: 0, needed: 0, message: [0; 256] }
    }

    fn message(&self) -> String {
        let bytes: Vec<u8> = self.message.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

type Handle = *mut c_void;

/// `sheaf_transport_v1`: every field as the header declares it.
#[repr(C)]
struct TableV1 {
    version: u32,
    struct_size: u32,
    name: *const c_char,
    plugin_version: *const c_char,
    init: Option<unsafe extern "C" fn(*const c_char, usize, *mut Status) -> Handle>,
    send: Option<unsafe extern "C" fn(Handle, u32, u64, *const u8, usize, i64, *mut Status) -> i32>,
    recv: Option<unsafe extern "C" fn(Handle, u32, u64, *mut u8, usize, *mut usize, i64, *mut Status) -> i32>,
    abort: Option<unsafe extern "C" fn(Handle, u32, *const c_char)>,
    close: Option<unsafe extern "C" fn(Handle, i64, *mut Status) -> i32>,
    destroy: Option<unsafe extern "C" fn(Handle)>,
}

/// The functions of a loaded table, checked present.
#[derive(Clone, Copy)]
struct Functions {
    init: unsafe extern "C" fn(*const c_char, usize, *mut Status) -> Handle,
    send: unsafe extern "C" fn(Handle, u32, u64, *const u8, usize, i64, *mut Status) -> i32,
    recv: unsafe extern "C" fn(Handle, u32, u64, *mut u8, usize, *mut usize, i64, *mut Status) -> i32,
    abort: unsafe extern "C" fn(Handle, u32, *const c_char),
    close: unsafe extern "C" fn(Handle, i64, *mut Status) -> i32,
    destroy: unsafe extern "C" fn(Handle),
}

/// A loaded C transport library.
pub struct CTransport {
    pub file: PathBuf,
    /// The name a job selects it by.
    pub name: String,
    /// The vendor's version string.
    pub version: String,
    /// The header version its table follows.
    pub abi: u32,
    functions: Functions,
    /// Keeps the code the functions point into loaded.
    _library: libloading::Library,
}

impl std::fmt::Debug for CTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CTransport").field("file", &self.file).field("name", &self.name).finish()
    }
}

fn c_string(p: *const c_char, what: &str, file: &Path) -> Result<String, LoadError> {
    if p.is_null() {
        return Err(LoadError::Init {
            file: file.to_path_buf(),
            detail: format!("C transport: {what} is NULL"),
        });
    }
    // SAFETY: the header promises a NUL-terminated string living as long as the library.
    let s = unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| LoadError::Init {
        file: file.to_path_buf(),
        detail: format!("C transport: {what} is not UTF-8"),
    })?;
    Ok(s.to_owned())
}

/// The C transport in `file`, or `None` when it exports no C transport symbol.
pub fn load(file: &Path) -> Result<Option<Arc<CTransport>>, LoadError> {
    let init_err = |detail: String| LoadError::Init { file: file.to_path_buf(), detail };
    // SAFETY: loading a library runs its initialisers; a plugin directory holds code
    // the user chose to run, as for every plugin.
    let library = unsafe { libloading::Library::new(file) }
        .map_err(|e| LoadError::NotLoadable { file: file.to_path_buf(), detail: e.to_string() })?;
    // SAFETY: the header declares the symbol's type.
    let get: libloading::Symbol<unsafe extern "C" fn() -> *const TableV1> =
        match unsafe { library.get(SYMBOL_V1) } {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
    // SAFETY: as declared; the table lives as long as the library, which we keep.
    let table = unsafe { get() };
    if table.is_null() {
        return Err(init_err("C transport: sheaf_transport_plugin_v1() returned NULL".into()));
    }
    // SAFETY: non-null, and the library promises a `sheaf_transport_v1`; its version and
    // size are checked before anything else is read.
    let t = unsafe { &*table };
    if t.version != 1 || t.struct_size as usize != std::mem::size_of::<TableV1>() {
        return Err(init_err(format!(
            "C transport: sheaf_transport_plugin_v1 returned a table of version {} and {} bytes, \
             not version 1 of {} bytes: built against another sheaf_transport.h?",
            t.version,
            t.struct_size,
            std::mem::size_of::<TableV1>()
        )));
    }
    let missing = |f: &str| init_err(format!("C transport: the table's `{f}` is NULL"));
    let functions = Functions {
        init: t.init.ok_or_else(|| missing("init"))?,
        send: t.send.ok_or_else(|| missing("send"))?,
        recv: t.recv.ok_or_else(|| missing("recv"))?,
        abort: t.abort.ok_or_else(|| missing("abort"))?,
        close: t.close.ok_or_else(|| missing("close"))?,
        destroy: t.destroy.ok_or_else(|| missing("destroy"))?,
    };
    let name = c_string(t.name, "name", file)?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(init_err(format!("C transport: the name {name:?} is empty or has spaces")));
    }
    let version = c_string(t.plugin_version, "plugin_version", file)?;
    Ok(Some(Arc::new(CTransport {
        file: file.to_path_buf(),
        name,
        version,
        abi: C_TRANSPORT_VERSION,
        functions,
        _library: library,
    })))
}

impl CTransport {
    /// This rank's link: `init` with the transport's JSON configuration.
    pub fn link(self: &Arc<Self>, config_json: &str) -> Result<Box<dyn Link>, sheaf_core::Error> {
        let config: serde_json::Value =
            serde_json::from_str(config_json).map_err(|e| sheaf_core::Error::config("transport", e))?;
        let field = |k: &str| config.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize);
        let (Some(rank), Some(world)) = (field("rank"), field("world_size")) else {
            return Err(sheaf_core::Error::config("transport", "no rank or world_size"));
        };
        let mut status = Status::new();
        // SAFETY: a valid pointer and length, and a status to fill; `init` is checked
        // present at load.
        let handle =
            unsafe { (self.functions.init)(config_json.as_ptr().cast(), config_json.len(), &mut status) };
        if handle.is_null() {
            let e = to_comm_error(&self.name, Op::Connect, &status, world, Duration::ZERO);
            return Err(sheaf_core::Error::Comm(e));
        }
        Ok(Box::new(CLink { transport: self.clone(), handle, rank, world, hint: AtomicUsize::new(4096) }))
    }
}

/// One rank's link over a C transport.
struct CLink {
    transport: Arc<CTransport>,
    handle: Handle,
    rank: usize,
    world: usize,
    /// The capacity of the next `recv`'s buffer: the largest message seen, so a size
    /// that recurs is read in one call.
    hint: AtomicUsize,
}

// SAFETY: the header requires every function but `destroy` to be thread-safe, and
// `destroy` runs only in `Drop`, with no other reference left.
unsafe impl Send for CLink {}
// SAFETY: as above.
unsafe impl Sync for CLink {}

fn timeout_ms(deadline: Deadline) -> i64 {
    deadline.remaining().as_millis().min(i64::MAX as u128) as i64
}

/// The status of a failed call as the error a Rust transport would give.
fn to_comm_error(name: &str, op: Op, s: &Status, world: usize, waited: Duration) -> CommError {
    let peer = s.rank as usize;
    let msg = s.message();
    let blamed = peer < world;
    match s.code {
        TIMEOUT if blamed => CommError::Timeout { op, peer, waited },
        PEER_FAILED if blamed => CommError::PeerFailed { op, peer, reason: msg },
        ABORTED if blamed => CommError::Aborted { op, peer, reason: msg },
        PROTOCOL if blamed => CommError::Protocol { op, peer, detail: msg },
        INVALID => CommError::InvalidArgument { op, detail: format!("{name}: {msg}") },
        CLOSED => CommError::Closed { op },
        code => CommError::Transport { op, detail: format!("{name}: status {code} (rank {peer}): {msg}") },
    }
}

impl CLink {
    fn error(&self, op: Op, s: &Status, started: std::time::Instant) -> CommError {
        to_comm_error(&self.transport.name, op, s, self.world, started.elapsed())
    }

    /// Receives into `ptr` (`cap` bytes): the length, or the status.
    fn recv_raw(
        &self,
        peer: usize,
        tag: Tag,
        ptr: *mut u8,
        cap: usize,
        deadline: Deadline,
    ) -> Result<usize, Box<Status>> {
        let mut status = Box::new(Status::new());
        let mut got = 0usize;
        // SAFETY: `ptr` is valid for `cap` bytes of writes; the handle is live.
        let rc = unsafe {
            (self.transport.functions.recv)(
                self.handle,
                peer as u32,
                tag.0,
                ptr,
                cap,
                &mut got,
                timeout_ms(deadline),
                &mut *status,
            )
        };
        if rc == OK && got <= cap {
            Ok(got)
        } else if rc == OK {
            status.code = PROTOCOL;
            status.rank = peer as u32;
            Err(status)
        } else {
            status.code = rc;
            Err(status)
        }
    }
}

impl Link for CLink {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], deadline: Deadline) -> Result<(), CommError> {
        check_link_peer(self.rank, self.world, peer, Op::Send)?;
        let started = std::time::Instant::now();
        let mut status = Status::new();
        // SAFETY: `data` is valid for its length; the handle is live.
        let rc = unsafe {
            (self.transport.functions.send)(
                self.handle,
                peer as u32,
                tag.0,
                data.as_ptr(),
                data.len(),
                timeout_ms(deadline),
                &mut status,
            )
        };
        if rc == OK {
            return Ok(());
        }
        status.code = rc;
        Err(self.error(Op::Send, &status, started))
    }

    fn recv(&self, peer: usize, tag: Tag, deadline: Deadline) -> Result<Vec<u8>, CommError> {
        check_link_peer(self.rank, self.world, peer, Op::Recv)?;
        let started = std::time::Instant::now();
        let mut cap = self.hint.load(Ordering::Relaxed);
        loop {
            let mut buf: Vec<u8> = Vec::with_capacity(cap);
            match self.recv_raw(peer, tag, buf.as_mut_ptr(), cap, deadline) {
                Ok(got) => {
                    // SAFETY: the transport wrote `got` <= capacity bytes.
                    unsafe { buf.set_len(got) };
                    return Ok(buf);
                }
                Err(s) if s.code == TRUNCATED && s.needed as usize > cap => {
                    cap = s.needed as usize;
                    self.hint.fetch_max(cap, Ordering::Relaxed);
                }
                Err(s) => return Err(self.error(Op::Recv, &s, started)),
            }
        }
    }

    fn recv_into(
        &self,
        peer: usize,
        tag: Tag,
        dst: &mut [u8],
        reduce: Option<(DType, ReduceOp)>,
        deadline: Deadline,
    ) -> Result<(), CommError> {
        check_link_peer(self.rank, self.world, peer, Op::Recv)?;
        let started = std::time::Instant::now();
        let want = dst.len();
        let wrong_size = |got: u64| CommError::Protocol {
            op: Op::Recv,
            peer,
            detail: format!("a message of {got} bytes where {want} were expected"),
        };
        match reduce {
            None => match self.recv_raw(peer, tag, dst.as_mut_ptr(), dst.len(), deadline) {
                Ok(got) if got == want => Ok(()),
                Ok(got) => Err(wrong_size(got as u64)),
                Err(s) if s.code == TRUNCATED => Err(wrong_size(s.needed)),
                Err(s) => Err(self.error(Op::Recv, &s, started)),
            },
            Some((dtype, op)) => {
                let message = self.recv(peer, tag, deadline)?;
                if message.len() != dst.len() {
                    return Err(wrong_size(message.len() as u64));
                }
                sheaf_collectives::reduce::combine(dst, &message, dtype, op);
                Ok(())
            }
        }
    }

    fn abort(&self, culprit: usize, reason: &str) {
        let reason = CString::new(reason.replace('\0', " ")).unwrap_or_default();
        // SAFETY: a NUL-terminated string; the handle is live.
        unsafe { (self.transport.functions.abort)(self.handle, culprit as u32, reason.as_ptr()) }
    }

    fn close(&self, deadline: Deadline) -> Result<(), CommError> {
        let started = std::time::Instant::now();
        let mut status = Status::new();
        // SAFETY: the handle is live.
        let rc = unsafe { (self.transport.functions.close)(self.handle, timeout_ms(deadline), &mut status) };
        if rc == OK {
            return Ok(());
        }
        status.code = rc;
        Err(self.error(Op::Close, &status, started))
    }
}

impl Drop for CLink {
    fn drop(&mut self) {
        // SAFETY: the last use of the handle.
        unsafe { (self.transport.functions.destroy)(self.handle) }
    }
}
