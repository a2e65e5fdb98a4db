//! sigil-agent's TPM helper (`sigil_tpm::helper`): the only Sigil binary that links libtss2.
fn main() -> std::process::ExitCode {
    sigil_tpm::helper::main()
}
