"""The CLI's commands by area; importing a module registers its commands on hpc.cli.app."""
