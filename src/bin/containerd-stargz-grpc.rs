fn main() {
    eprintln!("containerd-stargz-grpc: not yet implemented");
    std::process::exit(1);
}
