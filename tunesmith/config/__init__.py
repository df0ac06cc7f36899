"""Configuration: the flag groups, the command table, ms-swift's compatibility tables, the parser and the value
checks every command shares. Imports nothing of tunesmith but errors, so `tunesmith --help` stays instant."""
