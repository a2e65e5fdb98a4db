//! sigil: inspect and fetch SPIFFE identities
