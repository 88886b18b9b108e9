//! The process's plumbing, below every layer: answers handed from keyward's
//! threads to waiting tasks (`handoff`), background work tied to its
//! owner's life (`periodic`), and owner-only files (`files`).

pub mod files;
pub mod handoff;
pub mod periodic;
