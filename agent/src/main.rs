//! kiln-agent: the on-device updater (see ARCHITECTURE.md, "Updates").
fn main() {
    eprintln!("kiln-agent: not built yet");
    std::process::exit(2);
}
