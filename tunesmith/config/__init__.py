"""Configuration: the flag groups (groups), what each command takes (commands), ms-swift's compatibility tables
(swift_compat), the parser (parser), the typed slices the stages take (slices) and the value checks every command
shares (checks). Imports nothing of tunesmith but errors, so `tunesmith --help` stays instant."""
