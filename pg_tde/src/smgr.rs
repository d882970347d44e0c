//! The encrypting storage manager: md.c with pages encrypted on their way to
//! disk and decrypted on their way back, installed through the core patch's
//! `smgr_register_extension()`.
//!
//! Synchronous reads (`smgr_readv`: PostgreSQL 17's buffer manager, and
//! `RelationCopyStorage` in every major) decrypt here; PostgreSQL 18's
//! asynchronous reads (`smgr_startreadv`) decrypt in an AIO completion
//! callback, see [`crate::aio_read`].  Writes are synchronous in both.
//!
//! Shared buffers hold plaintext, so checksums are computed on plaintext.  A
//! file is encrypted when its key map has an entry for it (see [`keys`]);
//! every other file goes to md.c untouched.  Pages that md.c zero-extends stay
//! zero on disk, and an all-zero page read back is passed up as it is: the
//! buffer manager treats it as a new page.
//!
//! Tweaks: the XTS data-unit number (or the CBC IV input) is the fork and
//! block number; the init fork uses the main fork's number because recovery
//! copies an unlogged relation's init fork over its main fork byte for byte.

use std::cell::RefCell;
use std::ffi::c_void;

use pgrx::pg_sys;
use pgrx::prelude::*;
use tde_core::cipher::{is_all_zero, PAGE_SIZE};

use crate::errors;
use crate::ffi;
use crate::keys::{self, FileId, FileKey};

/// Install the storage manager.  Must run in `_PG_init` during
/// shared_preload_libraries processing.
pub fn init() {
    let sm = pg_sys::f_smgr {
        smgr_init: Some(ffi::mdinit),
        smgr_shutdown: None,
        smgr_open: Some(ffi::mdopen),
        smgr_close: Some(ffi::mdclose),
        smgr_create: Some(ffi::mdcreate),
        smgr_exists: Some(ffi::mdexists),
        smgr_unlink: Some(tde_unlink),
        smgr_extend: Some(tde_extend),
        smgr_zeroextend: Some(ffi::mdzeroextend),
        smgr_prefetch: Some(ffi::mdprefetch),
        #[cfg(feature = "pg18")]
        smgr_maxcombine: Some(ffi::mdmaxcombine),
        smgr_readv: Some(tde_readv),
        #[cfg(feature = "pg18")]
        smgr_startreadv: Some(crate::aio_read::tde_startreadv),
        smgr_writev: Some(tde_writev),
        smgr_writeback: Some(ffi::mdwriteback),
        smgr_nblocks: Some(ffi::mdnblocks),
        smgr_truncate: Some(ffi::mdtruncate),
        smgr_immedsync: Some(ffi::mdimmedsync),
        smgr_registersync: Some(ffi::mdregistersync),
        #[cfg(feature = "pg18")]
        smgr_fd: Some(ffi::mdfd),
    };
    // SAFETY: smgr_register_extension copies the struct; we are in _PG_init
    // during shared_preload_libraries, as it requires.
    unsafe { pg_sys::smgr_register_extension(&sm) };
    write_transform_marker();
}

/// The marker file by which the core patch's `pg_checksums` (and any offline
/// tool that honours it) knows that relation pages are not stored as
/// PostgreSQL wrote them: first line the extension, then the hint it prints.
pub const TRANSFORM_MARKER: &str = "pg_relfile_transform";
const TRANSFORM_MARKER_TEXT: &str = "pg_tde\nUse pg_tde_checksums, which decrypts each page of an encrypted relation \
                                     with its key; stock tools would check or rewrite ciphertext.\n";

/// Write [`TRANSFORM_MARKER`] into the data directory if it is not there:
/// once the storage manager is loaded, any relation file may be encrypted.
/// A failure is logged, never fatal (the marker only protects offline tools).
fn write_transform_marker() {
    // SAFETY: DataDir is set (and the postmaster is in it) before
    // shared_preload_libraries are loaded; a plain read of a C string.
    let datadir = unsafe {
        let d = (&raw const pg_sys::DataDir).read();
        if d.is_null() {
            return;
        }
        std::ffi::CStr::from_ptr(d).to_string_lossy().into_owned()
    };
    let path = std::path::Path::new(&datadir).join(TRANSFORM_MARKER);
    if std::fs::read(&path).is_ok_and(|b| b == TRANSFORM_MARKER_TEXT.as_bytes()) {
        return;
    }
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, TRANSFORM_MARKER_TEXT)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        ereport!(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("pg_tde could not write \"{}\": {e}", path.display())
        );
    }
}

/// Fork number used in the tweak.
pub(crate) fn tweak_fork(fork: pg_sys::ForkNumber::Type) -> u32 {
    if fork == pg_sys::ForkNumber::INIT_FORKNUM {
        pg_sys::ForkNumber::MAIN_FORKNUM as u32
    } else {
        fork as u32
    }
}

pub(crate) fn is_temp(rl: &pg_sys::RelFileLocatorBackend) -> bool {
    rl.backend != pg_sys::INVALID_PROC_NUMBER
}

/// The cipher of the file behind `reln`, or `None` when it is plaintext.
///
/// # Safety
/// `reln` must be a valid SMgrRelation.
pub(crate) unsafe fn cipher_of(reln: pg_sys::SMgrRelation) -> Option<std::sync::Arc<FileKey>> {
    // SAFETY: per the contract reln is valid.
    let rl = unsafe { (*reln).smgr_rlocator };
    match keys::file_cipher(FileId::from(rl.locator), is_temp(&rl)) {
        Ok(c) => c,
        Err(e) => errors::raise(e),
    }
}

/// A page buffer aligned like PostgreSQL's I/O buffers (`PG_IO_ALIGN_SIZE`), so that
/// ciphertext can be written with `debug_io_direct` and the cipher's wide loads and
/// stores never straddle cache lines.
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

thread_local! {
    /// Scratch pages for ciphertext on its way to md.c, reused across calls.
    static SCRATCH: RefCell<Vec<AlignedPage>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with `n` scratch pages.
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [AlignedPage]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut scratch = s.borrow_mut();
        if scratch.len() < n {
            scratch.resize_with(n, || AlignedPage([0; PAGE_SIZE]));
        }
        f(&mut scratch[..n])
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_readv(
    reln: pg_sys::SMgrRelation,
    forknum: pg_sys::ForkNumber::Type,
    blocknum: pg_sys::BlockNumber,
    buffers: *mut *mut c_void,
    nblocks: pg_sys::BlockNumber,
) {
    // SAFETY: arguments are passed through unchanged from smgrreadv.
    unsafe { ffi::guarded(|| ffi::mdreadv(reln, forknum, blocknum, buffers, nblocks)) };
    // SAFETY: reln is the valid SMgrRelation smgrreadv was called with.
    let Some(cipher) = (unsafe { cipher_of(reln) }) else { return };
    for i in 0..nblocks {
        // SAFETY: smgrreadv hands us nblocks buffers of BLCKSZ bytes each,
        // which mdreadv has just filled.
        let page = unsafe { std::slice::from_raw_parts_mut(*buffers.add(i as usize) as *mut u8, PAGE_SIZE) };
        if !is_all_zero(page) {
            cipher.decrypt_page(forknum, blocknum + i, page);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_writev(
    reln: pg_sys::SMgrRelation,
    forknum: pg_sys::ForkNumber::Type,
    blocknum: pg_sys::BlockNumber,
    buffers: *mut *const c_void,
    nblocks: pg_sys::BlockNumber,
    skip_fsync: bool,
) {
    // SAFETY: reln is the valid SMgrRelation smgrwritev was called with.
    let Some(cipher) = (unsafe { cipher_of(reln) }) else {
        // SAFETY: arguments passed through unchanged.
        unsafe { ffi::guarded(|| ffi::mdwritev(reln, forknum, blocknum, buffers, nblocks, skip_fsync)) };
        return;
    };
    let n = nblocks as usize;
    with_scratch(n, |scratch| {
        let mut ptrs: Vec<*const c_void> = Vec::with_capacity(n);
        for (i, out) in scratch.iter_mut().enumerate() {
            // SAFETY: smgrwritev hands us nblocks buffers of BLCKSZ bytes.
            let page = unsafe { std::slice::from_raw_parts(*buffers.add(i) as *const u8, PAGE_SIZE) };
            cipher.encrypt_page_into(forknum, blocknum + i as u32, page, &mut out.0);
            ptrs.push(out.0.as_ptr() as *const c_void);
        }
        // SAFETY: ptrs holds nblocks valid page pointers into scratch, which
        // outlives the call.
        unsafe { ffi::guarded(|| ffi::mdwritev(reln, forknum, blocknum, ptrs.as_mut_ptr(), nblocks, skip_fsync)) };
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_extend(
    reln: pg_sys::SMgrRelation,
    forknum: pg_sys::ForkNumber::Type,
    blocknum: pg_sys::BlockNumber,
    buffer: *const c_void,
    skip_fsync: bool,
) {
    // SAFETY: reln is the valid SMgrRelation smgrextend was called with.
    let Some(cipher) = (unsafe { cipher_of(reln) }) else {
        // SAFETY: arguments passed through unchanged.
        unsafe { ffi::guarded(|| ffi::mdextend(reln, forknum, blocknum, buffer, skip_fsync)) };
        return;
    };
    with_scratch(1, |scratch| {
        // SAFETY: smgrextend hands us one buffer of BLCKSZ bytes.
        let page = unsafe { std::slice::from_raw_parts(buffer as *const u8, PAGE_SIZE) };
        let out = &mut scratch[0].0;
        cipher.encrypt_page_into(forknum, blocknum, page, out);
        // SAFETY: out is a valid page buffer for the duration of the call.
        unsafe { ffi::guarded(|| ffi::mdextend(reln, forknum, blocknum, out.as_ptr() as *const c_void, skip_fsync)) };
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn tde_unlink(
    rlocator: pg_sys::RelFileLocatorBackend,
    forknum: pg_sys::ForkNumber::Type,
    is_redo: bool,
) {
    // SAFETY: arguments passed through unchanged.
    unsafe { ffi::guarded(|| ffi::mdunlink(rlocator, forknum, is_redo)) };
    if forknum == pg_sys::ForkNumber::MAIN_FORKNUM || forknum == pg_sys::ForkNumber::InvalidForkNumber {
        // Unlinking happens after commit or abort: never raise an error here.
        if let Err(e) = keys::remove_file_key(FileId::from(rlocator.locator), is_temp(&rlocator)) {
            errors::warn("could not remove the key of an unlinked relation file", &e);
        }
    }
}
