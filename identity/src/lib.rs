//! Sigil identity core.
