/* tern dp: differential-privacy accounting from the command line (include/tern/privacy.h).
 *
 *   tern dp epsilon  epsilon spent by a DP-SGD run (sample rate, noise multiplier, steps)
 *   tern dp noise    the smallest noise multiplier that keeps a run within a target epsilon
 *
 * Both take --accountant rdp (default) or prv, and print plain "name value" lines. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "tern.h"

static const char DP_USAGE[] =
    "usage: tern dp <subcommand> [options]\n\n"
    "Privacy accounting for DP-SGD with Poisson sampling (as Opacus computes it).\n\n"
    "Subcommands:\n"
    "  epsilon   epsilon spent by --steps steps at --sample-rate and --noise-multiplier\n"
    "  noise     the noise multiplier reaching --target-epsilon in --steps steps\n\n"
    "Run 'tern dp <subcommand> --help' for details.\n";

static const char ACCOUNTANT_HELP[] =
    "  --accountant rdp|prv  rdp: Renyi DP at Opacus's 151 default orders, converted with\n"
    "                        Balle et al. 2020 (default); prv: numerical composition of\n"
    "                        privacy loss random variables (Gopi et al. 2021), tighter, with\n"
    "                        an error of at most 0.01 in epsilon (the upper end is printed)\n";

static const char EPSILON_HELP[] =
    "usage: tern dp epsilon --sample-rate Q --noise-multiplier S --steps T --delta D\n"
    "                       [--accountant rdp|prv]\n\n"
    "Prints the epsilon of (epsilon, delta)-DP spent by T steps of DP-SGD in which each example\n"
    "is in a batch with probability Q and the clipped gradient sum gets Gaussian noise of S\n"
    "times the clipping norm; for rdp also the order that gives the bound.\n\n"
    "  --sample-rate Q       batch size / dataset size, in (0, 1]\n"
    "  --noise-multiplier S  noise standard deviation / clipping norm, > 0\n"
    "  --steps T             optimizer steps (epochs / Q)\n"
    "  --delta D             in (0, 1); usually below 1 / dataset size\n"
    "%s\n"
    "Example (Opacus's reference case: 90 epochs at sample rate 0.04):\n"
    "  tern dp epsilon --sample-rate 0.04 --noise-multiplier 1.5 --steps 2250 --delta 1e-5\n"
    "  epsilon 7.32911117144\n"
    "  order 3.9\n";

static const char NOISE_HELP[] =
    "usage: tern dp noise --sample-rate Q --steps T --delta D --target-epsilon E\n"
    "                     [--accountant rdp|prv]\n\n"
    "Prints the noise multiplier that Opacus's get_noise_multiplier finds: the smallest, to\n"
    "a bisection tolerance of 0.01 in epsilon, for which T steps at sample rate Q spend at most\n"
    "E at delta D; and the epsilon it spends.\n\n"
    "  --sample-rate Q       batch size / dataset size, in (0, 1]\n"
    "  --steps T             optimizer steps (epochs / Q)\n"
    "  --delta D             in (0, 1)\n"
    "  --target-epsilon E    the budget, > 0\n"
    "%s\n"
    "Example:\n"
    "  tern dp noise --sample-rate 0.04 --steps 2000 --delta 1e-5 --target-epsilon 8\n"
    "  noise_multiplier 1.35620117188\n"
    "  epsilon 7.99937802467\n";

static int need(bool given, const char *option)
{
    return given ? 0 : die("%s is required (see --help)", option);
}

static int epsilon_cmd(const cli *c, const tern_accountant_options *o)
{
    int rc;
    if ((rc = need(c->sample_rate > 0, "--sample-rate")) ||
        (rc = need(c->noise_multiplier > 0, "--noise-multiplier")) ||
        (rc = need(c->steps > 0, "--steps")) || (rc = need(c->delta > 0, "--delta")))
        return rc;
    if (c->target_epsilon > 0)
        return die("option --target-epsilon does not apply here (see --help)");
    tern_error err = {{0}};
    tern_accountant *a = NULL;
    if (tern_accountant_create(o, &a, &err) != TERN_OK)
        return die("%s", err.message);
    tern_privacy_spent sp;
    if (tern_accountant_add(a, c->noise_multiplier, c->sample_rate, c->steps) != TERN_OK ||
        tern_accountant_spent(a, c->delta, &sp) != TERN_OK) {
        rc = die("%s", tern_accountant_last_error(a));
    } else {
        printf("epsilon %.12g\n", sp.epsilon);
        if (o->kind == TERN_ACCOUNTANT_RDP)
            printf("order %.12g\n", sp.best_order);
        else
            printf("estimate %.12g\nlower %.12g\n", sp.epsilon_estimate, sp.epsilon_lower);
    }
    tern_accountant_destroy(&a);
    return rc;
}

static int noise_cmd(const cli *c, const tern_accountant_options *o)
{
    int rc;
    if ((rc = need(c->sample_rate > 0, "--sample-rate")) || (rc = need(c->steps > 0, "--steps")) ||
        (rc = need(c->delta > 0, "--delta")) ||
        (rc = need(c->target_epsilon > 0, "--target-epsilon")))
        return rc;
    if (c->noise_multiplier > 0)
        return die("option --noise-multiplier does not apply here (see --help)");
    tern_noise_query q = {.sample_rate = c->sample_rate, .steps = c->steps, .delta = c->delta,
                          .target_epsilon = c->target_epsilon};
    tern_error err = {{0}};
    double sigma, eps;
    if (tern_accountant_noise_multiplier(&sigma, o, &q, &err) != TERN_OK)
        return die("%s", err.message);
    tern_accountant *a = NULL;
    if (tern_accountant_create(o, &a, &err) != TERN_OK)
        return die("%s", err.message);
    if (tern_accountant_add(a, sigma, c->sample_rate, c->steps) != TERN_OK ||
        tern_accountant_epsilon(a, c->delta, &eps) != TERN_OK)
        rc = die("%s", tern_accountant_last_error(a));
    else
        printf("noise_multiplier %.12g\nepsilon %.12g\n", sigma, eps);
    tern_accountant_destroy(&a);
    return rc;
}

int tern_cmd_dp(int argc, char **argv)
{
    if (argc < 2) {
        fputs(DP_USAGE, stderr);
        return 1;
    }
    const char *sub = argv[1];
    if (!strcmp(sub, "--help") || !strcmp(sub, "-h") || !strcmp(sub, "help")) {
        fputs(DP_USAGE, stdout);
        return 0;
    }
    bool is_epsilon = strcmp(sub, "epsilon") == 0;
    if (!is_epsilon && strcmp(sub, "noise") != 0) {
        fprintf(stderr, "tern dp: unknown subcommand '%s'\n\n%s", sub, DP_USAGE);
        return 1;
    }
    static char prog[32];
    snprintf(prog, sizeof prog, "tern dp %s", sub);
    cli_prog = prog;
    cli c = {0};
    int rc = cli_parse(argc - 1, argv + 1, CMD_DP, false, &c);
    if (rc == 2) {
        printf(is_epsilon ? EPSILON_HELP : NOISE_HELP, ACCOUNTANT_HELP);
        return 0;
    }
    if (rc)
        return rc;
    tern_accountant_options o = {.kind = TERN_ACCOUNTANT_RDP};
    if (c.accountant && tern_accountant_kind_parse(c.accountant, &o.kind) != TERN_OK)
        return die("unknown --accountant '%s' (rdp or prv)", c.accountant);
    return is_epsilon ? epsilon_cmd(&c, &o) : noise_cmd(&c, &o);
}
