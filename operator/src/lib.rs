//! sigil-operator: the CA, the identity index and the Node API
