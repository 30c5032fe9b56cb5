/* tern sim: a whole federated run on one machine. A fresh server directory (store, initial
 * model, CURVE keys), N registered clients, the server in this process, and N real client
 * processes (this same binary running `tern client run`, each on its partition of
 * Fashion-MNIST) talking to it over 127.0.0.1. Prints the server's round table, a summary and
 * the store's versions.
 *
 * The clients' API keys reach them through the environment (TERN_API_KEY), never argv; their
 * logs go to DIR/client-I.log. Children die with the simulation: they get SIGTERM when it
 * exits (PR_SET_PDEATHSIG, even if it is killed), and are waited for on every path. */
#define _GNU_SOURCE /* PR_SET_PDEATHSIG is in <sys/prctl.h> regardless; environ */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "tern.h"
#include "tern_fl.h"

extern char **environ;

typedef struct child {
    pid_t pid;
    bool alive;
    int status;
    char name[32];
    char key[65];
    char log[PATH_MAX + 64];
} child;

typedef struct sim {
    const cli *c;
    char dir[PATH_MAX];
    child *kids;
    int n;
    const char *self;
    pthread_t monitor;
    bool monitor_running;
    volatile bool stopping;
    pthread_mutex_t lock;
} sim;

static void sleep_ms(int ms)
{
    nanosleep(&(struct timespec){ms / 1000, (long)(ms % 1000) * 1000000L}, NULL);
}

/* Reaps children that exited; true when one failed. Caller holds s->lock. */
static bool reap(sim *s, bool report)
{
    bool any = false;
    for (int i = 0; i < s->n; i++) {
        child *k = &s->kids[i];
        if (!k->alive)
            continue;
        int st;
        pid_t r = waitpid(k->pid, &st, WNOHANG);
        if (r == k->pid || (r < 0 && errno == ECHILD)) {
            k->alive = false;
            k->status = st;
            /* Exit status 0: the server ended the run (GOODBYE) and the client left. */
            bool ok = r == k->pid && WIFEXITED(st) && WEXITSTATUS(st) == 0;
            any |= !ok;
            if (report && !s->stopping && !ok) {
                if (WIFEXITED(st))
                    fprintf(stderr, "%s: %s exited with status %d; its log: %s\n", cli_prog,
                            k->name, WEXITSTATUS(st), k->log);
                else if (WIFSIGNALED(st))
                    fprintf(stderr, "%s: %s was killed by signal %d; its log: %s\n", cli_prog,
                            k->name, WTERMSIG(st), k->log);
            }
        }
    }
    return any;
}

/* Watches the clients while the server runs: when one dies early, the run cannot reach its
 * minimum of clients, so it is stopped rather than left waiting. */
static void *monitor(void *arg)
{
    sim *s = arg;
    while (!s->stopping) {
        pthread_mutex_lock(&s->lock);
        bool died = reap(s, true);
        pthread_mutex_unlock(&s->lock);
        if (died && !s->stopping) {
            fprintf(stderr, "%s: stopping the run: a client is gone\n", cli_prog);
            fl_server_stop();
        }
        sleep_ms(100);
    }
    return NULL;
}

/* Forks and execs `self client run ...` for client i, with its key in the environment and its
 * output in its log file. */
static int spawn(sim *s, int i, const char *endpoint)
{
    const cli *c = s->c;
    child *k = &s->kids[i];
    char parts[16], index[16], limit[32], threads[16], pseed[32], server_key[PATH_MAX + 32];
    snprintf(parts, sizeof parts, "%d", s->n);
    snprintf(index, sizeof index, "%d", i);
    snprintf(limit, sizeof limit, "%lld", c->limit_per_client);
    snprintf(threads, sizeof threads, "%d", c->threads > 0 ? c->threads : 1);
    snprintf(pseed, sizeof pseed, "%lld", c->seed);
    snprintf(server_key, sizeof server_key, "%s/" FL_KEY_DIR "/server.pub", s->dir);
    const char *argv[32];
    int a = 0;
    argv[a++] = s->self;
    argv[a++] = "client";
    argv[a++] = "run";
    argv[a++] = "--endpoint";
    argv[a++] = endpoint;
    argv[a++] = "--name";
    argv[a++] = k->name;
    argv[a++] = "--data";
    argv[a++] = "fashion-mnist";
    argv[a++] = "--partition";
    argv[a++] = c->partition;
    argv[a++] = "--num-partitions";
    argv[a++] = parts;
    argv[a++] = "--partition-index";
    argv[a++] = index;
    argv[a++] = "--partition-seed";
    argv[a++] = pseed;
    argv[a++] = "--limit";
    argv[a++] = limit;
    argv[a++] = "--threads";
    argv[a++] = threads;
    if (c->insecure) {
        argv[a++] = "--insecure";
    } else {
        argv[a++] = "--server-key";
        argv[a++] = server_key;
    }
    argv[a] = NULL;

    /* The environment, built before fork: the child only calls async-signal-safe functions. */
    size_t nenv = 0;
    while (environ[nenv])
        nenv++;
    char **envp = malloc((nenv + 2) * sizeof *envp);
    char keyvar[96];
    if (!envp)
        return die("out of memory");
    size_t e = 0;
    for (size_t j = 0; j < nenv; j++)
        if (strncmp(environ[j], "TERN_API_KEY=", 13) != 0)
            envp[e++] = environ[j];
    snprintf(keyvar, sizeof keyvar, "TERN_API_KEY=%s", k->key);
    envp[e++] = keyvar;
    envp[e] = NULL;

    int fd = open(k->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        free(envp);
        return die("cannot create %s: %s", k->log, strerror(errno));
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent) /* the parent died before prctl */
            _exit(127);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        execve(s->self, (char *const *)argv, envp);
        _exit(127);
    }
    int saved = errno;
    close(fd);
    free(envp);
    if (pid < 0)
        return die("cannot start %s: %s", k->name, strerror(saved));
    k->pid = pid;
    k->alive = true;
    return 0;
}

static int started(void *user, tern_server *server)
{
    sim *s = user;
    const char *endpoint = tern_server_endpoint(server);
    fprintf(stderr, "%s: server on %s (%s); starting %d clients, logs in %s/client-*.log\n",
            cli_prog, endpoint, s->c->insecure ? "insecure" : "CURVE", s->n, s->dir);
    for (int i = 0; i < s->n; i++) {
        pthread_mutex_lock(&s->lock);
        int rc = spawn(s, i, endpoint);
        pthread_mutex_unlock(&s->lock);
        if (rc)
            return rc;
    }
    if (pthread_create(&s->monitor, NULL, monitor, s) != 0)
        return die("cannot start the client monitor");
    s->monitor_running = true;
    return 0;
}

/* Waits up to ms for every child; true when all are gone. */
static bool wait_all(sim *s, int ms)
{
    for (int t = 0;; t += 20) {
        pthread_mutex_lock(&s->lock);
        reap(s, false);
        bool any = false;
        for (int i = 0; i < s->n; i++)
            any |= s->kids[i].alive;
        pthread_mutex_unlock(&s->lock);
        if (!any)
            return true;
        if (t >= ms)
            return false;
        sleep_ms(20);
    }
}

static void signal_all(sim *s, int sig)
{
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < s->n; i++)
        if (s->kids[i].alive)
            kill(s->kids[i].pid, sig);
    pthread_mutex_unlock(&s->lock);
}

/* Every child ends. After a complete run they leave by themselves on the server's GOODBYE
 * (graceful); otherwise, and for stragglers, SIGTERM (a client's clean stop), then SIGKILL. */
static void end_children(sim *s, bool graceful)
{
    s->stopping = true;
    if (s->monitor_running) {
        pthread_join(s->monitor, NULL);
        s->monitor_running = false;
    }
    if (!graceful || !wait_all(s, 5000)) {
        signal_all(s, SIGTERM);
        if (!wait_all(s, 3000)) {
            signal_all(s, SIGKILL);
            wait_all(s, 100000);
        }
    }
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int print_versions(const char *dir)
{
    tern_store *st = NULL;
    tern_error err = {{0}};
    if (tern_store_open(dir, &(tern_store_options){.read_only = true}, &st, &err) != TERN_OK)
        return die("%s", err.message);
    tern_model_version *v = NULL;
    size_t n = 0;
    int rc = 0;
    if (tern_store_version_list(st, &v, &n, &err) != TERN_OK) {
        rc = die("%s", err.message);
    } else {
        printf("\nmodel versions in the store (store rounds count every attempt, and the initial\n"
               "model's commit):\n%-10s %11s %9s %10s  %s\n", "version", "store round",
               "accuracy", "size", "sha256");
        for (size_t i = 0; i < n; i++) {
            char acc[16] = "-";
            if (isfinite(v[i].accuracy) && v[i].round > 0)
                snprintf(acc, sizeof acc, "%.2f%%", 100 * v[i].accuracy);
            printf("%-10s %11lld %9s %10llu  %.16s...\n", v[i].version, (long long)v[i].round,
                   acc, (unsigned long long)v[i].size, v[i].sha256);
        }
    }
    tern_store_free(st, v);
    tern_store_close(&st);
    return rc;
}

static const char SIM_HELP[] =
    "usage: tern sim [options]\n\n"
    "A federated run on this machine: creates a server directory, registers N clients, runs\n"
    "the server here and N client processes (each training on its partition of Fashion-MNIST)\n"
    "over 127.0.0.1 with CURVE encryption, and prints one line per round, a summary and the\n"
    "model versions committed to the store.\n\n"
    "  --clients N            client processes (default 4)\n"
    "  --rounds R             rounds (default 5)\n"
    "  --partition P          iid, dirichlet:ALPHA or classes:K (default dirichlet:0.5)\n"
    "  --limit-per-client N   training images per client (default 5000)\n"
    "  --strategy S           fedavg (default), fedprox, fedavgm, fedadam, fedyogi, ...\n"
    "  --local-epochs E       (default 1)\n"
    "  --batch B              (default 32)\n"
    "  --lr F                 client SGD learning rate (default 0.05, momentum 0.9)\n"
    "  --schedule constant|cosine, --lr-min F   learning rate over the rounds (as in tern\n"
    "                         server run; default constant)\n"
    "  --lr-warmup-rounds W, --weight-decay F   as in tern server run\n"
    "  --label-smoothing F    label smoothing of the clients' training loss (default 0)\n"
    "  --max-steps N          cap on each client's steps per round\n"
    "  --fraction-fit F, --fraction-evaluate F, --min-fit-clients N, --policy P,\n"
    "  --min-completion F, --round-timeout S, --proximal-mu MU, --fedbn, --patience P\n"
    "                         as in tern server run\n"
    "  --test-limit N         server-side test images (default 2000)\n"
    "  --bn-calibration N     re-estimate each aggregated model's BatchNorm statistics on N\n"
    "                         Fashion-MNIST training images before evaluating and committing\n"
    "                         it (default 0: keep the averaged statistics)\n"
    "  --width-mult F, --arch small|large, --bn-momentum F   the model (default Small, 1.0, 0.1)\n"
    "  --norm batch|group     normalization layers (default batch; --dp needs group)\n"
    "  --dp client|central, --noise-multiplier S, --target-epsilon E, --max-grad-norm C,\n"
    "  --clip-norm S, --delta D, --epsilon-budget E, --expected-clients M, --accountant A\n"
    "                         differential privacy, as in tern server run; the round lines\n"
    "                         and the JSON log show epsilon\n"
    "  --threads T            threads per client and for the server's evaluation (default 1)\n"
    "  --seed S               model, partition, selection and training seeds (default 0)\n"
    "  --store DIR            server directory (default: a new temporary one)\n"
    "  --keep                 keep the temporary directory (it is kept anyway on failure)\n"
    "  --insecure             no CURVE (default: on, as in production)\n"
    "  --json-log FILE        append one JSON line per round\n"
    "  --no-sync              no fsync of the store at each commit (a power loss may lose\n"
    "                         the last rounds)\n"
    "  --verbose, --quiet     more or fewer server log lines on stderr\n\n"
    "example: tern sim --clients 4 --rounds 5 --partition dirichlet:0.5\n";

int tern_cmd_sim(int argc, char **argv)
{
    cli c = {.clients = 4, .rounds = 5, .partition = "dirichlet:0.5", .limit_per_client = 5000,
             .test_limit = 2000, .momentum = -1, .fraction_evaluate = -1, .proximal_mu = -1};
    int rc = cli_parse(argc, argv, CMD_SIM, false, &c);
    if (rc == 2) {
        fputs(SIM_HELP, stdout);
        return 0;
    }
    if (rc)
        return rc;
    if (strcmp(c.partition, "iid") && strncmp(c.partition, "dirichlet:", 10) &&
        strncmp(c.partition, "classes:", 8))
        return die("bad --partition '%s' (iid, dirichlet:ALPHA or classes:K)", c.partition);
    if (c.min_fit_clients > c.clients)
        return die("--min-fit-clients %d is more than --clients %d", c.min_fit_clients, c.clients);

    sim s = {.c = &c, .n = c.clients, .lock = PTHREAD_MUTEX_INITIALIZER};
    char self[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0)
        return die("cannot find this program (/proc/self/exe): %s", strerror(errno));
    self[len] = 0;
    s.self = self;
    bool temp = !c.store;
    if (temp) {
        const char *tmp = getenv("TMPDIR");
        snprintf(s.dir, sizeof s.dir, "%s/tern-sim-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(s.dir))
            return die("cannot create a directory in %s: %s", tmp && *tmp ? tmp : "/tmp",
                       strerror(errno));
    } else {
        char probe[PATH_MAX];
        snprintf(s.dir, sizeof s.dir, "%s", c.store);
        snprintf(probe, sizeof probe, "%s/data.mdb", c.store);
        struct stat sb;
        if (stat(probe, &sb) == 0)
            return die("%s already holds a store: tern sim starts from a new one (continue a "
                       "run with tern server run)", c.store);
    }
    s.kids = calloc((size_t)s.n, sizeof *s.kids);
    if (!s.kids)
        return die("out of memory");
    double t0 = cli_now();
    char pub[TERN_CURVE_KEY_SIZE];
    cli ic = c;
    if (!ic.bn_momentum)
        ic.bn_momentum = 0.1f;
    if ((rc = fl_server_init(&ic, s.dir, pub, false)))
        goto done;
    tern_store *st = NULL;
    tern_error err = {{0}};
    if (tern_store_open(s.dir, NULL, &st, &err) != TERN_OK) {
        rc = die("%s", err.message);
        goto done;
    }
    for (int i = 0; i < s.n && rc == 0; i++) {
        child *k = &s.kids[i];
        snprintf(k->name, sizeof k->name, "client-%d", i + 1);
        snprintf(k->log, sizeof k->log, "%s/%s.log", s.dir, k->name);
        tern_client_record rec;
        rc = fl_register_client(st, k->name, "sim", k->key, &rec);
    }
    tern_store_close(&st);
    if (rc)
        goto done;
    printf("tern sim: %d clients, %d rounds, %s partition of Fashion-MNIST (%lld images per "
           "client), %s, server test set %lld images; directory %s (set up in %.1f s)\n",
           s.n, c.rounds, c.partition, c.limit_per_client,
           c.strategy ? c.strategy : "fedavg", c.test_limit, s.dir, cli_now() - t0);
    fflush(stdout);

    cli rc_c = c;
    rc_c.endpoint = "tcp://127.0.0.1:0";
    rc_c.test_data = "fashion-mnist";
    rc_c.store = s.dir;
    if (!rc_c.min_available_clients)
        rc_c.min_available_clients = s.n; /* round 1 waits for everybody */
    if (!rc_c.min_fit_clients)
        rc_c.min_fit_clients = s.n < 2 ? s.n : 2;
    if (rc_c.min_fit_clients > rc_c.min_available_clients)
        rc_c.min_fit_clients = rc_c.min_available_clients;
    if (!rc_c.wait_timeout)
        rc_c.wait_timeout = 300;
    fl_run_hooks hooks = {.started = started, .user = &s};
    fl_run_result res;
    rc = fl_server_run(&rc_c, s.dir, &hooks, &res);
    end_children(&s, rc == 0 && !res.interrupted);
    if (rc == 0 && res.interrupted)
        rc = 130;
    if (rc == 0)
        rc = print_versions(s.dir);
    if (rc == 0)
        printf("total %.1f s\n", cli_now() - t0);
done:
    end_children(&s, false);
    if (temp && !c.keep_store && rc == 0)
        nftw(s.dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    else
        fprintf(stderr, "%s: the server directory and the client logs are in %s\n", cli_prog,
                s.dir);
    free(s.kids);
    return rc;
}
