//! Declarations of PostgreSQL functions that pgrx's bindings do not include
//! (`storage/md.h`, `commands/sequence.h`, and for 18 what the AIO read path
//! needs).  Signatures copied from the PostgreSQL 17 and 18 headers; keep
//! them in sync when a supported major changes.
#![allow(non_snake_case)]

use std::ffi::{c_int, c_void};

use pgrx::pg_sys::{BlockNumber, ForkNumber, Oid, RelFileLocatorBackend, SMgrRelation};

/// Call into PostgreSQL through pgrx's guard: an ERROR raised inside comes back
/// as a Rust panic (turned into an ERROR again by our own `#[pg_guard]` entry
/// point), never as a longjmp across Rust frames.  The declarations below stay
/// unguarded because the storage manager table needs them as C function
/// pointers; direct calls go through this.
///
/// # Safety
/// `f` must be a sound call into PostgreSQL, made from the backend's main thread.
pub unsafe fn guarded<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: per the contract.
    unsafe { pgrx::pg_sys::ffi::pg_guard_ffi_boundary(f) }
}

#[allow(improper_ctypes)]
unsafe extern "C-unwind" {
    /// `postmaster/bgwriter.h`, not in pgrx's bindings.
    pub fn RequestCheckpoint(flags: std::ffi::c_int);
    /// `tcop/tcopprot.h`: the backends' SIGTERM handler, as a C function pointer
    /// (pgrx wraps the binding in a Rust function).
    pub fn die(postgres_signal_arg: std::ffi::c_int);
    /// `storage/checksum.h`, not in pgrx's bindings.
    pub fn pg_checksum_page(page: *mut std::ffi::c_char, blkno: u32) -> u16;
    pub fn mdinit();
    pub fn mdopen(reln: SMgrRelation);
    pub fn mdclose(reln: SMgrRelation, forknum: ForkNumber::Type);
    pub fn mdcreate(reln: SMgrRelation, forknum: ForkNumber::Type, isRedo: bool);
    pub fn mdexists(reln: SMgrRelation, forknum: ForkNumber::Type) -> bool;
    pub fn mdunlink(rlocator: RelFileLocatorBackend, forknum: ForkNumber::Type, isRedo: bool);
    pub fn mdextend(
        reln: SMgrRelation,
        forknum: ForkNumber::Type,
        blocknum: BlockNumber,
        buffer: *const c_void,
        skipFsync: bool,
    );
    pub fn mdzeroextend(
        reln: SMgrRelation,
        forknum: ForkNumber::Type,
        blocknum: BlockNumber,
        nblocks: c_int,
        skipFsync: bool,
    );
    pub fn mdprefetch(reln: SMgrRelation, forknum: ForkNumber::Type, blocknum: BlockNumber, nblocks: c_int) -> bool;
    pub fn mdreadv(
        reln: SMgrRelation,
        forknum: ForkNumber::Type,
        blocknum: BlockNumber,
        buffers: *mut *mut c_void,
        nblocks: BlockNumber,
    );
    pub fn mdwritev(
        reln: SMgrRelation,
        forknum: ForkNumber::Type,
        blocknum: BlockNumber,
        buffers: *mut *const c_void,
        nblocks: BlockNumber,
        skipFsync: bool,
    );
    pub fn mdwriteback(reln: SMgrRelation, forknum: ForkNumber::Type, blocknum: BlockNumber, nblocks: BlockNumber);
    pub fn mdnblocks(reln: SMgrRelation, forknum: ForkNumber::Type) -> BlockNumber;
    pub fn mdtruncate(reln: SMgrRelation, forknum: ForkNumber::Type, old_blocks: BlockNumber, nblocks: BlockNumber);
    pub fn mdimmedsync(reln: SMgrRelation, forknum: ForkNumber::Type);
    pub fn mdregistersync(reln: SMgrRelation, forknum: ForkNumber::Type);

    #[cfg(feature = "pg18")]
    pub fn mdmaxcombine(reln: SMgrRelation, forknum: ForkNumber::Type, blocknum: BlockNumber) -> u32;
    #[cfg(feature = "pg18")]
    pub fn mdstartreadv(
        ioh: *mut pgrx::pg_sys::PgAioHandle,
        reln: SMgrRelation,
        forknum: ForkNumber::Type,
        blocknum: BlockNumber,
        buffers: *mut *mut c_void,
        nblocks: BlockNumber,
    );
    #[cfg(feature = "pg18")]
    pub fn mdfd(reln: SMgrRelation, forknum: ForkNumber::Type, blocknum: BlockNumber, off: *mut u32) -> c_int;

    /// Rewrites a sequence into a new relfilenumber, keeping its state.
    pub fn SequenceChangePersistence(relid: Oid, newrelpersistence: std::ffi::c_char);

    /// `tcop/utility.h`, declared here without pgrx's guard: the utility hook
    /// lets the statement's ERRORs propagate as raised (see `hooks`).
    pub fn standard_ProcessUtility(
        pstmt: *mut pgrx::pg_sys::PlannedStmt,
        queryString: *const std::ffi::c_char,
        readOnlyTree: bool,
        context: pgrx::pg_sys::ProcessUtilityContext::Type,
        params: pgrx::pg_sys::ParamListInfo,
        queryEnv: *mut pgrx::pg_sys::QueryEnvironment,
        dest: *mut pgrx::pg_sys::DestReceiver,
        qc: *mut pgrx::pg_sys::QueryCompletion,
    );
}

/// `storage/aio.h` (PostgreSQL 18), which pgrx's bindings do not include.
#[cfg(feature = "pg18")]
pub mod aio {
    use std::ffi::{c_int, c_uint};

    use pgrx::pg_sys::{PgAioHandle, PgAioResult, PgAioTargetData};

    /// `PgAioHandleCallbackID` of the slot the core patch adds for an extension
    /// (after INVALID, MD_READV, SHARED_BUFFER_READV, LOCAL_BUFFER_READV).
    pub const PGAIO_HCB_EXTENSION: c_uint = 4;

    pub type Complete = unsafe extern "C-unwind" fn(*mut PgAioHandle, PgAioResult, u8) -> PgAioResult;
    pub type Report = unsafe extern "C-unwind" fn(PgAioResult, *const PgAioTargetData, c_int);

    /// `struct PgAioHandleCallbacks`.
    #[repr(C)]
    pub struct PgAioHandleCallbacks {
        pub stage: Option<unsafe extern "C-unwind" fn(*mut PgAioHandle, u8)>,
        pub complete_shared: Option<Complete>,
        pub complete_local: Option<Complete>,
        pub report: Option<Report>,
    }

    #[allow(improper_ctypes)]
    unsafe extern "C-unwind" {
        pub static io_max_concurrency: c_int;
        pub fn pgaio_io_get_id(ioh: *mut PgAioHandle) -> c_int;
        pub fn pgaio_io_register_callbacks(ioh: *mut PgAioHandle, cb_id: c_uint, cb_data: u8);
        pub fn pgaio_io_get_target_data(ioh: *mut PgAioHandle) -> *mut PgAioTargetData;
        /// From the core patch.
        pub fn pgaio_register_extension_callbacks(cb: *const PgAioHandleCallbacks);
        /// `storage/aio_internal.h`: the iovecs of a defined IO, and how many.
        /// Internal to PostgreSQL's AIO (its comment names debugging as the
        /// use); the iovecs are what md.c read into, and nothing public gives
        /// them to a completion callback.
        pub fn pgaio_io_get_iovec_length(ioh: *mut PgAioHandle, iov: *mut *mut libc::iovec) -> c_int;
    }
}
