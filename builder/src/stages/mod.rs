//! The build stages, in the order `build::build` runs them. Each stage reads the frozen plan
//! and writes only below the build's work directory.

pub mod bootstrap;
pub mod customize;
pub mod disk;
pub mod esp;
pub mod manifest;
pub mod rootfs;
pub mod sbom;

use crate::plan::Plan;
use std::path::PathBuf;

/// Paths of one build. The plan is frozen; the context only says where things go.
pub struct Context<'a> {
    pub plan: &'a Plan,
    /// Scratch space for this build (`<out>/.work/<name>`).
    pub work: PathBuf,
    /// The root tree being built.
    pub tree: PathBuf,
    /// Outputs are written here, then moved to their final place.
    pub staging: PathBuf,
    /// kiln's templates, rendered with the plan as context.
    pub templates: crate::templates::Templates,
}
