//! engine: snapshot and resume of live Linux processes.
