"""The web GUI: ``volkeeper gui`` serves it over the control APIs of any number of nodes."""
