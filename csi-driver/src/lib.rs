//! sigil-csi: the CSI node plugin that mounts identities into pods
