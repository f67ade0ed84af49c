//! What to build: a profile (`profile`) for a board (`image`), services from the catalog
//! (`services`), package versions pinned by a lock (`lock`), resolved into one [`plan::Plan`];
//! `device` is the device.json the plan bakes for the agent.

pub mod device;
pub mod image;
pub mod lock;
pub mod plan;
pub mod profile;
pub mod services;
