//! Declarations of PostgreSQL functions that pgrx's bindings do not include
//! (`storage/md.h`, `commands/sequence.h`).  Signatures copied from the
//! PostgreSQL 17 headers; keep them in sync when the pinned version changes.
#![allow(non_snake_case)]

use std::ffi::{c_int, c_void};

use pgrx::pg_sys::{BlockNumber, ForkNumber, Oid, RelFileLocatorBackend, SMgrRelation};

#[allow(improper_ctypes)]
unsafe extern "C-unwind" {
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

    /// Rewrites a sequence into a new relfilenumber, keeping its state.
    pub fn SequenceChangePersistence(relid: Oid, newrelpersistence: std::ffi::c_char);
}
