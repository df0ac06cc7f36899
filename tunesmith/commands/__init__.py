"""The commands' entry points (`main(args)`), one module a command; only the CLI imports them."""
