"""The Open Images challenge metric, its class hierarchy and its submission CSV."""
