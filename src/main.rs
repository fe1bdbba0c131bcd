use std::process::ExitCode;

fn main() -> ExitCode {
    clipft::cli::main()
}
