//! placeholder, replaced by the client helper
