//! The process's plumbing, below every layer: answers handed from keyward's
//! threads to waiting tasks (`handoff`), the background tasks' one owner
//! (`supervisor`), and owner-only files (`files`).

pub mod files;
pub mod handoff;
pub mod supervisor;
