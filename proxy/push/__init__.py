"""Push policy: which ref updates a party may push, read off the receive-pack wire and answered in git's words.

`rules` is the config model (imported by proxy.config); `gate.check_push` is the one call `forward` makes. Nothing
is imported here, so that loading the config does not load the pack reader."""
