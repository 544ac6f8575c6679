"""The device simulator: a physical model of an EV, a board and a meter behind real Modbus."""
