fn main() {
    eprintln!("ctr-remote: not yet implemented");
    std::process::exit(1);
}
