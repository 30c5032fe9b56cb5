/* tern-server: the same as `tern server ...` (apps/tern_server.c), as its own program. */
#include "cli.h"

int main(int argc, char **argv)
{
    cli_prog = "tern-server";
    return tern_cmd_server(argc, argv);
}
