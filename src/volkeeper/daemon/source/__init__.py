"""The source end of a mirror: shipping writes, the intent log, resync, verify."""
