//! Releases: `kiln publish` signs and publishes a build into a channel's feed (`publish`);
//! `kiln inspect` reads a build back and checks it against its manifest (`inspect`);
//! `kiln status` reads what the devices running the releases say about themselves (`status`);
//! `kiln delta` measures what an update would download if devices fetched only what they lack
//! (`delta`).

pub mod delta;
pub mod inspect;
pub mod publish;
pub mod status;
