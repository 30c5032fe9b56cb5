/* tern-client: the same as `tern client ...` (apps/tern_client.c), as its own program. */
#include "cli.h"

int main(int argc, char **argv)
{
    cli_prog = "tern-client";
    return tern_cmd_client(argc, argv);
}
