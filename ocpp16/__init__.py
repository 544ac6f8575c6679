"""ocpp16 package."""
