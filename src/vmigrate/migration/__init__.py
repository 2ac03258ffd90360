"""The migration phase protocol (begin, prepare, perform, finish, confirm), one module per mode."""
