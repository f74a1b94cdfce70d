fn main() -> std::process::ExitCode {
    create_mcpay::run()
}
