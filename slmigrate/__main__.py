from slmigrate.cli import entry

entry()
