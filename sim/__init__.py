"""sparsa verification: cocotb testbenches and the launcher that builds and runs them."""
