//! The machine kiln runs on: the one process spawner (`exec`), the host tools kiln needs and
//! which Debian package provides each (`tools`), `kiln doctor` (`doctor`), progress output.
//! `exec` names the package of a missing program from `tools`; `doctor` reads `tools` and runs
//! apt-get through `exec` (no module uses one that uses it back). `userns` runs kiln again as
//! root of a user namespace for an ordinary user's build.

pub mod doctor;
pub mod exec;
pub mod progress;
pub mod tools;
pub mod userns;
