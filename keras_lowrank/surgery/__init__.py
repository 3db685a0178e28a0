"""Model surgery: finding target layers and adapting them in place."""
