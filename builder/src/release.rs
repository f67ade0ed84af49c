//! Releases: `kiln publish` signs and publishes a build into a channel's feed (`publish`);
//! `kiln inspect` reads a build back and checks it against its manifest (`inspect`).

pub mod inspect;
pub mod publish;
