// loadgen: the load generator and the backends of the sni-router benchmark, in one program.
//
// A tool of the benchmark, not part of the product: bench/run.ts compiles it with `cc -O2` and runs
// it as two processes, `loadgen backend ...` and `loadgen client ...`, because 9,500 idle proxied
// connections need 9,500 descriptors on each side and a process may open at most 20,000.
//
// Only 127.0.0.1. Every mode is bounded in time. Results are one JSON line on stdout; progress
// marks ({"mark":"start"} when the measured window opens, {"mark":"end"} when it closes,
// {"mark":"ready"} when idle connections are all up) let the harness sample the proxy's CPU time
// and memory exactly around the window.
//
// Backend (listens on one or more ports; the i-th port's byte of reply is 'A' + i):
//   loadgen backend --ports 4001,4002 --mode reply|hold|sink|source|echo --hello-bytes N
//     Each connection first consumes the N bytes of the forwarded ClientHello, then:
//     reply  writes one byte and waits for the client's FIN, then closes (new connections, TTFB)
//     hold   writes one byte and keeps the connection open (idle connections)
//     sink   reads and discards everything (throughput, client to backend)
//     source writes 64 KiB chunks as fast as the peer takes them (throughput, backend to client)
//     echo   writes back every byte it reads (the TURN-like load)
//   Runs until SIGTERM/SIGINT (or --max-seconds), then prints its counters.
//
// Client (connects to --port; every connection first sends the ClientHello from --hello):
//   loadgen client conn  --conc K --duration S --warmup S            connect, hello, 1 byte back, close
//   loadgen client tput  --streams S --dir up|down --duration S --warmup S   64 KiB writes
//   loadgen client turn  --conns 500 --interval-ms 20 --size 200 --duration S --warmup S
//   loadgen client idle  --conns 9500 --parallel 256 --hold S         open, hold until stdin closes
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)       // the size of every bulk write
#define READ_BUF (256 * 1024)   // bulk reads take whatever is there, up to this
#define MAX_EVENTS 512
#define MAX_PORTS 8

static volatile sig_atomic_t g_stop = 0;
static uint8_t g_chunk[CHUNK];
static uint8_t g_rbuf[READ_BUF];

static void on_signal(int sig) {
  (void)sig;
  g_stop = 1;
}

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "loadgen: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  exit(2);
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void ep_add(int ep, int fd, uint32_t events, void *ptr) {
  struct epoll_event ev = {.events = events, .data.ptr = ptr};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add: %s", strerror(errno));
}

static void ep_mod(int ep, int fd, uint32_t events, void *ptr) {
  struct epoll_event ev = {.events = events, .data.ptr = ptr};
  if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0) die("epoll_ctl mod: %s", strerror(errno));
}

/** Waits for events until deadline_ns (0: forever), with nanosecond precision. */
static int ep_wait(int ep, struct epoll_event *evs, uint64_t deadline_ns) {
  struct timespec ts, *tsp = NULL;
  if (deadline_ns != 0) {
    uint64_t now = now_ns();
    uint64_t d = deadline_ns > now ? deadline_ns - now : 0;
    ts.tv_sec = (time_t)(d / 1000000000ull);
    ts.tv_nsec = (long)(d % 1000000000ull);
    tsp = &ts;
  }
  int n = epoll_pwait2(ep, evs, MAX_EVENTS, tsp, NULL);
  if (n < 0 && errno != EINTR) die("epoll_pwait2: %s", strerror(errno));
  return n < 0 ? 0 : n;
}

static void setup_process(void) {
  // Die with the harness, whatever happens to it.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  for (size_t i = 0; i < CHUNK; i++) g_chunk[i] = (uint8_t)(i * 131u + 7u);
}

// ---------------------------------------------------------------------------------------------
// Latency samples and percentiles
// ---------------------------------------------------------------------------------------------

typedef struct {
  uint32_t *v; // nanoseconds, clamped to UINT32_MAX (4.29 s)
  size_t n, cap;
} samples_t;

static void samples_add(samples_t *s, uint64_t ns) {
  if (s->n == s->cap) {
    s->cap = s->cap ? s->cap * 2 : 65536;
    s->v = realloc(s->v, s->cap * sizeof *s->v);
    if (!s->v) die("out of memory");
  }
  s->v[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

/** Prints "name":{"p50":..,"p90":..,"p99":..,"p999":..,"max":..,"mean":..,"n":..} in microseconds. */
static void print_latency(const char *name, samples_t *s) {
  if (s->n == 0) {
    printf("\"%s\":null", name);
    return;
  }
  qsort(s->v, s->n, sizeof *s->v, cmp_u32);
  double sum = 0;
  for (size_t i = 0; i < s->n; i++) sum += s->v[i];
#define PCT(p) (s->v[(size_t)((double)(s->n - 1) * (p) + 0.5)] / 1000.0)
  printf("\"%s\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"p999\":%.1f,\"max\":%.1f,\"mean\":%.1f,\"n\":%zu}", name,
         PCT(0.5), PCT(0.9), PCT(0.99), PCT(0.999), s->v[s->n - 1] / 1000.0, sum / (double)s->n / 1000.0, s->n);
#undef PCT
}

static void mark(const char *name) {
  printf("{\"mark\":\"%s\"}\n", name);
  fflush(stdout);
}

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

enum bmode { B_REPLY, B_HOLD, B_SINK, B_SOURCE, B_ECHO };

typedef struct {
  int is_listener;
  int fd;
  uint8_t letter;
} blistener_t;

typedef struct {
  int is_listener; // 0
  int fd;
  uint32_t need;   // ClientHello bytes still to consume
  uint8_t letter;
  uint8_t sending; // source mode: writing
  uint8_t *pend;   // echo: bytes not yet written back
  uint32_t pend_len, pend_cap;
} bconn_t;

typedef struct {
  enum bmode mode;
  uint32_t hello_bytes;
  int ep;
  uint64_t accepted, closed, bytes_in, bytes_out, accept_errors, resets;
  int open;
} backend_t;

static void bconn_close(backend_t *b, bconn_t *c) {
  close(c->fd);
  free(c->pend);
  free(c);
  b->closed++;
  b->open--;
}

/** Source mode: writes 64 KiB chunks while the socket takes them (a few per wakeup, then yields). */
static int bconn_source(backend_t *b, bconn_t *c) {
  for (int i = 0; i < 8; i++) {
    ssize_t n = write(c->fd, g_chunk, CHUNK);
    if (n < 0) {
      if (errno == EAGAIN) return 0;
      return -1;
    }
    b->bytes_out += (uint64_t)n;
    if (n < CHUNK) return 0;
  }
  return 0;
}

/** Echo mode: writes back data, keeping what the socket does not take for EPOLLOUT. */
static int bconn_echo(backend_t *b, bconn_t *c, const uint8_t *data, size_t len) {
  if (c->pend_len == 0) {
    ssize_t n = write(c->fd, data, len);
    if (n < 0) {
      if (errno != EAGAIN) return -1;
      n = 0;
    }
    b->bytes_out += (uint64_t)n;
    data += n;
    len -= (size_t)n;
    if (len == 0) return 0;
    ep_mod(b->ep, c->fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP, c);
  }
  if (c->pend_len + len > c->pend_cap) {
    c->pend_cap = (uint32_t)(c->pend_len + len) * 2;
    c->pend = realloc(c->pend, c->pend_cap);
    if (!c->pend) die("out of memory");
  }
  memcpy(c->pend + c->pend_len, data, len);
  c->pend_len += (uint32_t)len;
  return 0;
}

static int bconn_flush(backend_t *b, bconn_t *c) {
  if (c->pend_len > 0) {
    ssize_t n = write(c->fd, c->pend, c->pend_len);
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    b->bytes_out += (uint64_t)n;
    memmove(c->pend, c->pend + n, c->pend_len - (size_t)n);
    c->pend_len -= (uint32_t)n;
  }
  if (c->pend_len == 0) ep_mod(b->ep, c->fd, EPOLLIN | EPOLLRDHUP, c);
  return 0;
}

static void bconn_hello_done(backend_t *b, bconn_t *c) {
  switch (b->mode) {
  case B_REPLY:
  case B_HOLD:
    if (write(c->fd, &c->letter, 1) == 1) b->bytes_out++;
    break;
  case B_SOURCE:
    c->sending = 1;
    ep_mod(b->ep, c->fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP, c);
    break;
  default:
    break;
  }
}

/** Returns -1 when the connection is over. */
static int bconn_read(backend_t *b, bconn_t *c) {
  for (int i = 0; i < 8; i++) {
    ssize_t n = read(c->fd, g_rbuf, READ_BUF);
    if (n == 0) return -1;
    if (n < 0) {
      if (errno == EAGAIN) return 0;
      b->resets++;
      return -1;
    }
    b->bytes_in += (uint64_t)n;
    const uint8_t *p = g_rbuf;
    size_t len = (size_t)n;
    if (c->need > 0) {
      size_t take = len < c->need ? len : c->need;
      c->need -= (uint32_t)take;
      p += take;
      len -= take;
      if (c->need == 0) bconn_hello_done(b, c);
    }
    if (len > 0 && b->mode == B_ECHO && bconn_echo(b, c, p, len) < 0) return -1;
    if ((size_t)n < READ_BUF) return 0; // drained; level-triggered epoll says when there is more
  }
  return 0;
}

static void backend_accept(backend_t *b, blistener_t *l) {
  for (int i = 0; i < 64; i++) {
    int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) b->accept_errors++;
      return;
    }
    set_nodelay(fd);
    bconn_t *c = calloc(1, sizeof *c);
    if (!c) die("out of memory");
    c->fd = fd;
    c->need = b->hello_bytes;
    c->letter = l->letter;
    b->accepted++;
    b->open++;
    ep_add(b->ep, fd, EPOLLIN | EPOLLRDHUP, c);
    if (c->need == 0) bconn_hello_done(b, c);
  }
}

static int listen_on(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket: %s", strerror(errno));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind 127.0.0.1:%u: %s", port, strerror(errno));
  if (listen(fd, 4096) < 0) die("listen: %s", strerror(errno));
  return fd;
}

static int run_backend(uint16_t *ports, int nports, enum bmode mode, uint32_t hello_bytes, double max_seconds) {
  backend_t b = {.mode = mode, .hello_bytes = hello_bytes};
  b.ep = epoll_create1(EPOLL_CLOEXEC);
  blistener_t ls[MAX_PORTS];
  for (int i = 0; i < nports; i++) {
    ls[i].is_listener = 1;
    ls[i].fd = listen_on(ports[i]);
    ls[i].letter = (uint8_t)('A' + i);
    ep_add(b.ep, ls[i].fd, EPOLLIN, &ls[i]);
  }
  printf("{\"ready\":true}\n");
  fflush(stdout);
  uint64_t deadline = now_ns() + (uint64_t)(max_seconds * 1e9);
  struct epoll_event evs[MAX_EVENTS];
  while (!g_stop && now_ns() < deadline) {
    int n = ep_wait(b.ep, evs, deadline);
    for (int i = 0; i < n; i++) {
      if (*(int *)evs[i].data.ptr) {
        backend_accept(&b, evs[i].data.ptr);
        continue;
      }
      bconn_t *c = evs[i].data.ptr;
      uint32_t e = evs[i].events;
      int dead = 0;
      if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) dead = bconn_read(&b, c) < 0;
      if (!dead && (e & EPOLLOUT)) {
        if (c->sending) dead = bconn_source(&b, c) < 0;
        else dead = bconn_flush(&b, c) < 0;
      }
      if (dead) bconn_close(&b, c);
    }
  }
  printf("{\"backend\":{\"accepted\":%" PRIu64 ",\"closed\":%" PRIu64 ",\"open\":%d,\"bytes_in\":%" PRIu64
         ",\"bytes_out\":%" PRIu64 ",\"accept_errors\":%" PRIu64 ",\"resets\":%" PRIu64 "}}\n",
         b.accepted, b.closed, b.open, b.bytes_in, b.bytes_out, b.accept_errors, b.resets);
  fflush(stdout);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

enum cstate { C_FREE, C_CONNECTING, C_WAIT_REPLY, C_OPEN };

typedef struct {
  int fd;
  enum cstate state;
  uint32_t idx;
  uint32_t hello_off;      // bytes of the hello written so far
  uint64_t t_start;        // connect() called
  // turn mode
  uint8_t rbuf[256];
  uint32_t rlen;
  uint8_t *pend;
  uint32_t pend_len;
} cconn_t;

typedef struct {
  struct sockaddr_in target;
  const uint8_t *hello;
  uint32_t hello_len;
  int ep;
  // error counts by kind
  uint64_t err_connect, err_write, err_read, err_eof, err_timeout, err_addr;
} client_t;

static const char *arg_str(int argc, char **argv, const char *name, const char *dflt) {
  for (int i = 0; i < argc - 1; i++)
    if (strcmp(argv[i], name) == 0) return argv[i + 1];
  return dflt;
}

static double arg_num(int argc, char **argv, const char *name, double dflt) {
  const char *s = arg_str(argc, argv, name, NULL);
  return s ? atof(s) : dflt;
}

static uint8_t *read_file(const char *path, uint32_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) die("cannot open %s: %s", path, strerror(errno));
  struct stat st;
  fstat(fileno(f), &st);
  uint8_t *buf = malloc((size_t)st.st_size + 1);
  if (!buf || fread(buf, 1, (size_t)st.st_size, f) != (size_t)st.st_size) die("cannot read %s", path);
  fclose(f);
  *len = (uint32_t)st.st_size;
  return buf;
}

/** Writes the rest of the hello. 1: all written, 0: would block, -1: error. */
static int cconn_write_hello(client_t *cl, cconn_t *c) {
  while (c->hello_off < cl->hello_len) {
    ssize_t n = write(c->fd, cl->hello + c->hello_off, cl->hello_len - c->hello_off);
    if (n < 0) {
      if (errno == EAGAIN || errno == ENOTCONN || errno == EINPROGRESS) return 0;
      return -1;
    }
    c->hello_off += (uint32_t)n;
  }
  return 1;
}

/**
 * Starts a connection: socket, connect, and the hello at once when the socket is already
 * connected (on loopback the handshake has usually completed by the time connect() returns).
 * Registers level-triggered EPOLLIN, plus EPOLLOUT while the hello is not out. -1 on failure.
 */
static int cconn_start(client_t *cl, cconn_t *c) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    cl->err_connect++;
    return -1;
  }
  set_nodelay(fd);
  c->fd = fd;
  c->hello_off = 0;
  c->rlen = 0;
  c->pend_len = 0;
  c->t_start = now_ns();
  if (connect(fd, (struct sockaddr *)&cl->target, sizeof cl->target) < 0 && errno != EINPROGRESS) {
    if (errno == EADDRNOTAVAIL) cl->err_addr++;
    else cl->err_connect++;
    close(fd);
    return -1;
  }
  c->state = C_CONNECTING;
  int r = cconn_write_hello(cl, c);
  if (r < 0) {
    cl->err_connect++;
    close(fd);
    return -1;
  }
  if (r == 1) c->state = C_WAIT_REPLY;
  ep_add(cl->ep, fd, r == 1 ? EPOLLIN : EPOLLIN | EPOLLOUT, c);
  return 0;
}

static void cconn_close(cconn_t *c) {
  close(c->fd);
  c->fd = -1;
  c->state = C_FREE;
}

/** Handles EPOLLOUT while connecting: the hello goes out; then only EPOLLIN. -1 on error. */
static int cconn_on_writable(client_t *cl, cconn_t *c) {
  if (c->state != C_CONNECTING) return 0;
  int r = cconn_write_hello(cl, c);
  if (r < 0) {
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err == ECONNREFUSED || err == ETIMEDOUT || c->hello_off == 0) cl->err_connect++;
    else cl->err_write++;
    return -1;
  }
  if (r == 1) {
    c->state = C_WAIT_REPLY;
    ep_mod(cl->ep, c->fd, EPOLLIN, c);
  }
  return 0;
}

static void client_init(client_t *cl, int argc, char **argv) {
  memset(cl, 0, sizeof *cl);
  int port = (int)arg_num(argc, argv, "--port", 0);
  if (port <= 0 || port > 65535) die("client: --port is required");
  cl->target.sin_family = AF_INET;
  cl->target.sin_port = htons((uint16_t)port);
  cl->target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const char *hello = arg_str(argc, argv, "--hello", NULL);
  if (!hello) die("client: --hello FILE is required");
  cl->hello = read_file(hello, &cl->hello_len);
  cl->ep = epoll_create1(EPOLL_CLOEXEC);
}

static void print_errors(client_t *cl) {
  printf("\"errors\":{\"connect\":%" PRIu64 ",\"write\":%" PRIu64 ",\"read\":%" PRIu64 ",\"eof\":%" PRIu64
         ",\"timeout\":%" PRIu64 ",\"addr\":%" PRIu64 "}",
         cl->err_connect, cl->err_write, cl->err_read, cl->err_eof, cl->err_timeout, cl->err_addr);
}

static uint64_t total_errors(client_t *cl) {
  return cl->err_connect + cl->err_write + cl->err_read + cl->err_eof + cl->err_timeout + cl->err_addr;
}

// --- conn: new connections with K in flight; each: connect, hello, one byte back, close -------

static int run_conn(int argc, char **argv) {
  client_t cl;
  client_init(&cl, argc, argv);
  int conc = (int)arg_num(argc, argv, "--conc", 64);
  double duration = arg_num(argc, argv, "--duration", 10);
  double warmup = arg_num(argc, argv, "--warmup", 1);
  uint64_t timeout_ns = (uint64_t)(arg_num(argc, argv, "--timeout", 10) * 1e9);
  cconn_t *conns = calloc((size_t)conc, sizeof *conns);
  samples_t lat = {0};
  uint64_t t0 = now_ns();
  uint64_t t_start = t0 + (uint64_t)(warmup * 1e9);
  uint64_t t_end = t_start + (uint64_t)(duration * 1e9);
  uint64_t t_drain = t_end + 2000000000ull;
  uint64_t ok = 0, ok_total = 0, started = 0, incomplete = 0;
  int in_window = 0, ended = 0;
  uint64_t retry_at = 0;
  struct epoll_event evs[MAX_EVENTS];
  uint64_t next_timeout_check = t0 + 100000000ull;

  for (;;) {
    uint64_t now = now_ns();
    if (!in_window && now >= t_start) {
      in_window = 1;
      mark("start");
    }
    if (!ended && now >= t_end) {
      ended = 1;
      mark("end");
    }
    if (g_stop || now >= t_drain) break;
    // Keep K in flight until the window closes.
    int active = 0;
    for (int i = 0; i < conc; i++) {
      cconn_t *c = &conns[i];
      if (c->state == C_FREE && !ended && now >= retry_at) {
        c->idx = (uint32_t)i;
        if (cconn_start(&cl, c) == 0) started++;
        else retry_at = now + 1000000ull; // out of ports or refused: back off 1 ms
      }
      if (c->state != C_FREE) active++;
    }
    if (ended && active == 0) break;
    if (now >= next_timeout_check) {
      next_timeout_check = now + 100000000ull;
      for (int i = 0; i < conc; i++) {
        if (conns[i].state != C_FREE && now > conns[i].t_start && now - conns[i].t_start > timeout_ns) {
          cl.err_timeout++;
          cconn_close(&conns[i]);
        }
      }
    }
    uint64_t wake = retry_at > now ? retry_at : now + 50000000ull;
    if (!in_window && t_start < wake) wake = t_start;
    if (!ended && t_end < wake) wake = t_end;
    int n = ep_wait(cl.ep, evs, wake);
    for (int i = 0; i < n; i++) {
      cconn_t *c = evs[i].data.ptr;
      uint32_t e = evs[i].events;
      if (c->state == C_FREE) continue;
      if ((e & EPOLLOUT) && cconn_on_writable(&cl, c) < 0) {
        cconn_close(c);
        continue;
      }
      if (!(e & (EPOLLIN | EPOLLHUP | EPOLLERR)) || c->state != C_WAIT_REPLY) {
        if ((e & (EPOLLHUP | EPOLLERR)) && c->state == C_CONNECTING) {
          cl.err_connect++;
          cconn_close(c);
        }
        continue;
      }
      uint8_t byte[16];
      ssize_t r = read(c->fd, byte, sizeof byte);
      if (r > 0) {
        uint64_t t = now_ns();
        ok_total++;
        if (in_window && !ended) {
          ok++;
          samples_add(&lat, t - c->t_start);
        }
        cconn_close(c);
      } else if (r == 0) {
        cl.err_eof++;
        cconn_close(c);
      } else if (errno != EAGAIN) {
        cl.err_read++;
        cconn_close(c);
      }
    }
  }
  for (int i = 0; i < conc; i++) {
    if (conns[i].state != C_FREE) {
      incomplete++;
      cconn_close(&conns[i]);
    }
  }
  printf("{\"mode\":\"conn\",\"conc\":%d,\"window_s\":%.3f,\"ok\":%" PRIu64 ",\"ok_total\":%" PRIu64
         ",\"started\":%" PRIu64 ",\"incomplete\":%" PRIu64 ",\"rate\":%.1f,\"error_total\":%" PRIu64 ",",
         conc, duration, ok, ok_total, started, incomplete, (double)ok / duration, total_errors(&cl));
  print_errors(&cl);
  printf(",");
  print_latency("latency_us", &lat);
  printf("}\n");
  return 0;
}

// --- tput: S streams, 64 KiB writes, one direction --------------------------------------------

static int run_tput(int argc, char **argv) {
  client_t cl;
  client_init(&cl, argc, argv);
  int streams = (int)arg_num(argc, argv, "--streams", 1);
  const char *dir = arg_str(argc, argv, "--dir", "up");
  int up = strcmp(dir, "up") == 0;
  if (!up && strcmp(dir, "down") != 0) die("tput: --dir must be up or down");
  double duration = arg_num(argc, argv, "--duration", 5);
  double warmup = arg_num(argc, argv, "--warmup", 1);
  cconn_t *conns = calloc((size_t)streams, sizeof *conns);
  for (int i = 0; i < streams; i++) {
    conns[i].idx = (uint32_t)i;
    if (cconn_start(&cl, &conns[i]) < 0) die("tput: cannot connect stream %d", i);
    if (conns[i].state == C_WAIT_REPLY) {
      // The hello went out at once: from now on this stream moves bulk data.
      conns[i].state = C_OPEN;
      if (up) ep_mod(cl.ep, conns[i].fd, EPOLLIN | EPOLLOUT, &conns[i]);
    }
  }
  uint64_t t0 = now_ns();
  uint64_t t_start = t0 + (uint64_t)(warmup * 1e9);
  uint64_t t_end = t_start + (uint64_t)(duration * 1e9);
  uint64_t bytes = 0, bytes_total = 0;
  int in_window = 0, open = streams;
  struct epoll_event evs[MAX_EVENTS];
  while (!g_stop && open > 0) {
    uint64_t now = now_ns();
    if (!in_window && now >= t_start) {
      in_window = 1;
      mark("start");
    }
    if (now >= t_end) break;
    int n = ep_wait(cl.ep, evs, in_window ? t_end : t_start);
    for (int i = 0; i < n; i++) {
      cconn_t *c = evs[i].data.ptr;
      uint32_t e = evs[i].events;
      if (c->state == C_FREE) continue;
      int dead = 0;
      if (c->state == C_CONNECTING) {
        if (e & EPOLLOUT) {
          int r = cconn_write_hello(&cl, c);
          if (r < 0) {
            cl.err_write++;
            dead = 1;
          } else if (r == 1) {
            c->state = C_OPEN;
            ep_mod(cl.ep, c->fd, up ? EPOLLIN | EPOLLOUT : EPOLLIN, c);
          }
        } else if (e & (EPOLLHUP | EPOLLERR)) {
          cl.err_connect++;
          dead = 1;
        }
      }
      if (!dead && c->state == C_OPEN && up && (e & EPOLLOUT)) {
        for (int k = 0; k < 8; k++) {
          ssize_t w = write(c->fd, g_chunk, CHUNK);
          if (w < 0) {
            if (errno != EAGAIN) {
              cl.err_write++;
              dead = 1;
            }
            break;
          }
          bytes_total += (uint64_t)w;
          if (in_window) bytes += (uint64_t)w;
          if (w < CHUNK) break;
        }
      }
      if (!dead && c->state == C_OPEN && (e & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
        for (int k = 0; k < 8; k++) {
          ssize_t r = read(c->fd, g_rbuf, READ_BUF);
          if (r == 0) {
            cl.err_eof++;
            dead = 1;
            break;
          }
          if (r < 0) {
            if (errno != EAGAIN) {
              cl.err_read++;
              dead = 1;
            }
            break;
          }
          if (!up) {
            bytes_total += (uint64_t)r;
            if (in_window) bytes += (uint64_t)r;
          }
          if (r < READ_BUF) break;
        }
      }
      if (dead) {
        cconn_close(c);
        open--;
      }
    }
  }
  uint64_t t_stop = now_ns();
  mark("end");
  double window = in_window ? (double)((t_stop < t_end ? t_stop : t_end) - t_start) / 1e9 : 0;
  for (int i = 0; i < streams; i++)
    if (conns[i].state != C_FREE) cconn_close(&conns[i]);
  printf("{\"mode\":\"tput\",\"streams\":%d,\"dir\":\"%s\",\"window_s\":%.3f,\"bytes\":%" PRIu64
         ",\"bytes_total\":%" PRIu64 ",\"gbit_s\":%.3f,\"streams_lost\":%d,\"error_total\":%" PRIu64 ",",
         streams, dir, window, bytes, bytes_total, window > 0 ? (double)bytes * 8 / window / 1e9 : 0, streams - open,
         total_errors(&cl));
  print_errors(&cl);
  printf("}\n");
  return 0;
}

// --- turn: N connections each echoing a small packet every interval ---------------------------

static int turn_send(client_t *cl, cconn_t *c, uint32_t size, uint64_t t, uint64_t *dropped) {
  uint8_t pkt[1024];
  memset(pkt, 0xAB, size);
  memcpy(pkt, &t, sizeof t);
  memcpy(pkt + 8, &c->idx, sizeof c->idx);
  if (c->pend_len > 0) {
    if (c->pend_len + size > 16384) {
      (*dropped)++;
      return 0;
    }
    memcpy(c->pend + c->pend_len, pkt, size);
    c->pend_len += size;
    return 0;
  }
  ssize_t n = write(c->fd, pkt, size);
  if (n < 0) {
    if (errno != EAGAIN) return -1;
    n = 0;
  }
  if ((uint32_t)n < size) {
    if (!c->pend) c->pend = malloc(16384);
    memcpy(c->pend, pkt + n, size - (size_t)n);
    c->pend_len = size - (uint32_t)n;
    ep_mod(cl->ep, c->fd, EPOLLIN | EPOLLOUT, c);
  }
  return 0;
}

static int run_turn(int argc, char **argv) {
  client_t cl;
  client_init(&cl, argc, argv);
  int nconns = (int)arg_num(argc, argv, "--conns", 500);
  double interval_ms = arg_num(argc, argv, "--interval-ms", 20);
  uint32_t size = (uint32_t)arg_num(argc, argv, "--size", 200);
  double duration = arg_num(argc, argv, "--duration", 10);
  double warmup = arg_num(argc, argv, "--warmup", 2);
  if (size < 16 || size > 256) die("turn: --size must be 16..256");
  cconn_t *conns = calloc((size_t)nconns, sizeof *conns);
  // Open every connection first (a few hundred at a time are fine for any backlog).
  for (int i = 0; i < nconns; i++) {
    conns[i].idx = (uint32_t)i;
    if (cconn_start(&cl, &conns[i]) < 0) die("turn: cannot connect %d", i);
  }
  uint64_t period = (uint64_t)(interval_ms * 1e6);
  uint64_t spacing = period / (uint64_t)nconns; // sends are spread evenly over the interval
  uint64_t t0 = now_ns() + 10000000ull;
  uint64_t t_start = t0 + (uint64_t)(warmup * 1e9);
  uint64_t t_end = t_start + (uint64_t)(duration * 1e9);
  uint64_t t_drain = t_end + 1000000000ull;
  samples_t rtt = {0}, lag = {0};
  uint64_t seq = 0, sent = 0, sent_window = 0, recv = 0, recv_window = 0, dropped = 0, not_ready = 0;
  int in_window = 0, ended = 0, open = nconns;
  struct epoll_event evs[MAX_EVENTS];
  while (!g_stop && open > 0) {
    uint64_t now = now_ns();
    if (!in_window && now >= t_start) {
      in_window = 1;
      mark("start");
    }
    if (!ended && now >= t_end) {
      ended = 1;
      mark("end");
    }
    if (now >= t_drain || (ended && recv_window >= sent_window)) break;
    // Send everything that is due.
    while (!ended) {
      uint64_t due = t0 + (seq / (uint64_t)nconns) * period + (seq % (uint64_t)nconns) * spacing;
      if (due > now) break;
      cconn_t *c = &conns[seq % (uint64_t)nconns];
      seq++;
      if (c->state == C_FREE) continue;
      if (c->state == C_CONNECTING) {
        not_ready++;
        continue;
      }
      uint64_t t = now_ns();
      int counted = t >= t_start && t < t_end;
      if (counted) samples_add(&lag, t - due);
      if (turn_send(&cl, c, size, t, &dropped) < 0) {
        cl.err_write++;
        cconn_close(c);
        open--;
        continue;
      }
      sent++;
      if (counted) sent_window++;
    }
    uint64_t next_due = t0 + (seq / (uint64_t)nconns) * period + (seq % (uint64_t)nconns) * spacing;
    uint64_t wake = ended ? t_drain : next_due;
    if (!in_window && t_start < wake) wake = t_start;
    if (!ended && t_end < wake) wake = t_end;
    int n = ep_wait(cl.ep, evs, wake);
    for (int i = 0; i < n; i++) {
      cconn_t *c = evs[i].data.ptr;
      uint32_t e = evs[i].events;
      if (c->state == C_FREE) continue;
      int dead = 0;
      if (e & EPOLLOUT) {
        if (c->state == C_CONNECTING) {
          int r = cconn_write_hello(&cl, c);
          if (r < 0) {
            cl.err_connect++;
            dead = 1;
          } else if (r == 1) {
            c->state = C_OPEN;
            ep_mod(cl.ep, c->fd, EPOLLIN, c);
          }
        } else if (c->pend_len > 0) {
          ssize_t w = write(c->fd, c->pend, c->pend_len);
          if (w < 0 && errno != EAGAIN) dead = 1;
          if (w > 0) {
            memmove(c->pend, c->pend + w, c->pend_len - (size_t)w);
            c->pend_len -= (uint32_t)w;
          }
          if (!dead && c->pend_len == 0) ep_mod(cl.ep, c->fd, EPOLLIN, c);
        }
      }
      if (c->state == C_WAIT_REPLY) c->state = C_OPEN;
      if (!dead && (e & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
        uint8_t buf[8192];
        ssize_t r = read(c->fd, buf, sizeof buf);
        if (r == 0) {
          cl.err_eof++;
          dead = 1;
        } else if (r < 0) {
          if (errno != EAGAIN) {
            cl.err_read++;
            dead = 1;
          }
        } else {
          uint64_t t = now_ns();
          size_t off = 0;
          while (off < (size_t)r) {
            size_t take = size - c->rlen;
            if (take > (size_t)r - off) take = (size_t)r - off;
            memcpy(c->rbuf + c->rlen, buf + off, take);
            c->rlen += (uint32_t)take;
            off += take;
            if (c->rlen == size) {
              uint64_t ts;
              memcpy(&ts, c->rbuf, sizeof ts);
              c->rlen = 0;
              recv++;
              if (ts >= t_start && ts < t_end) {
                recv_window++;
                samples_add(&rtt, t - ts);
              }
            }
          }
        }
      }
      if (dead) {
        cconn_close(c);
        open--;
      }
    }
  }
  uint64_t lost = sent_window > recv_window ? sent_window - recv_window : 0;
  for (int i = 0; i < nconns; i++)
    if (conns[i].state != C_FREE) cconn_close(&conns[i]);
  printf("{\"mode\":\"turn\",\"conns\":%d,\"interval_ms\":%.1f,\"size\":%u,\"window_s\":%.3f,\"sent\":%" PRIu64
         ",\"sent_window\":%" PRIu64 ",\"received\":%" PRIu64 ",\"received_window\":%" PRIu64 ",\"lost\":%" PRIu64
         ",\"dropped\":%" PRIu64 ",\"not_ready\":%" PRIu64 ",\"conns_lost\":%d,\"error_total\":%" PRIu64 ",",
         nconns, interval_ms, size, duration, sent, sent_window, recv, recv_window, lost, dropped, not_ready,
         nconns - open, total_errors(&cl));
  print_errors(&cl);
  printf(",");
  print_latency("rtt_us", &rtt);
  printf(",");
  print_latency("send_lag_us", &lag);
  printf("}\n");
  return 0;
}

// --- idle: open N connections, hold them until stdin closes ------------------------------------

static int run_idle(int argc, char **argv) {
  client_t cl;
  client_init(&cl, argc, argv);
  int nconns = (int)arg_num(argc, argv, "--conns", 9500);
  int parallel = (int)arg_num(argc, argv, "--parallel", 256);
  double hold = arg_num(argc, argv, "--hold", 60);
  uint64_t timeout_ns = (uint64_t)(arg_num(argc, argv, "--timeout", 10) * 1e9);
  struct rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  if ((rlim_t)nconns + 16 > rl.rlim_cur) die("idle: %d connections need more than RLIMIT_NOFILE %lu", nconns,
                                             (unsigned long)rl.rlim_cur);
  cconn_t *conns = calloc((size_t)nconns, sizeof *conns);
  static int stdin_tag = -1; // data.ptr target for stdin (its first int is not a listener flag)
  fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
  struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &stdin_tag};
  int watch_stdin = epoll_ctl(cl.ep, EPOLL_CTL_ADD, 0, &sev) == 0;
  uint64_t t0 = now_ns();
  uint64_t t_ready = 0, deadline = t0 + (uint64_t)((hold + 120) * 1e9);
  int next = 0, pending = 0, established = 0, failed = 0, dropped = 0, ready = 0, quit = 0;
  samples_t setup = {0};
  struct epoll_event evs[MAX_EVENTS];
  uint64_t next_timeout_check = t0 + 100000000ull;
  while (!g_stop && !quit) {
    uint64_t now = now_ns();
    if (now >= deadline || (ready && now >= t_ready + (uint64_t)(hold * 1e9))) break;
    while (next < nconns && pending < parallel) {
      cconn_t *c = &conns[next];
      c->idx = (uint32_t)next++;
      if (cconn_start(&cl, c) < 0) failed++;
      else pending++;
    }
    if (!ready && next == nconns && pending == 0) {
      ready = 1;
      t_ready = now;
      printf("{\"mark\":\"ready\",\"established\":%d,\"failed\":%d,\"setup_s\":%.3f}\n", established, failed,
             (double)(now - t0) / 1e9);
      fflush(stdout);
    }
    if (now >= next_timeout_check && pending > 0) {
      next_timeout_check = now + 100000000ull;
      for (int i = 0; i < next; i++) {
        cconn_t *c = &conns[i];
        if ((c->state == C_CONNECTING || c->state == C_WAIT_REPLY) && now > c->t_start && now - c->t_start > timeout_ns) {
          cl.err_timeout++;
          cconn_close(c);
          pending--;
          failed++;
        }
      }
    }
    int n = ep_wait(cl.ep, evs, now + 100000000ull);
    for (int i = 0; i < n; i++) {
      if (evs[i].data.ptr == &stdin_tag) {
        char b[64];
        ssize_t r = read(0, b, sizeof b);
        if (r <= 0 || memchr(b, '\n', (size_t)r)) quit = 1;
        continue;
      }
      cconn_t *c = evs[i].data.ptr;
      uint32_t e = evs[i].events;
      if (c->state == C_FREE) continue;
      int was_pending = c->state != C_OPEN;
      int dead = 0;
      if ((e & EPOLLOUT) && cconn_on_writable(&cl, c) < 0) dead = 1;
      if (!dead && (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->state != C_CONNECTING) {
        uint8_t b[64];
        ssize_t r = read(c->fd, b, sizeof b);
        if (r > 0 && c->state == C_WAIT_REPLY) {
          c->state = C_OPEN;
          established++;
          pending--;
          samples_add(&setup, now_ns() - c->t_start);
        } else if (r == 0) {
          cl.err_eof++;
          dead = 1;
        } else if (r < 0 && errno != EAGAIN) {
          cl.err_read++;
          dead = 1;
        }
      } else if (!dead && (e & (EPOLLHUP | EPOLLERR)) && c->state == C_CONNECTING) {
        cl.err_connect++;
        dead = 1;
      }
      if (dead) {
        if (was_pending) {
          pending--;
          failed++;
        } else {
          established--;
          dropped++;
        }
        cconn_close(c);
      }
    }
  }
  (void)watch_stdin;
  int still_open = 0;
  for (int i = 0; i < nconns; i++) {
    if (conns[i].state == C_OPEN) still_open++;
    if (conns[i].state != C_FREE) cconn_close(&conns[i]);
  }
  printf("{\"mode\":\"idle\",\"conns\":%d,\"established\":%d,\"failed\":%d,\"dropped\":%d,\"open_at_end\":%d,"
         "\"error_total\":%" PRIu64 ",",
         nconns, established + dropped, failed, dropped, still_open, total_errors(&cl));
  print_errors(&cl);
  printf(",");
  print_latency("setup_us", &setup);
  printf("}\n");
  return 0;
}

// ---------------------------------------------------------------------------------------------

static void usage(void) {
  fprintf(stderr,
          "usage:\n"
          "  loadgen backend --ports P[,P...] --mode reply|hold|sink|source|echo --hello-bytes N [--max-seconds S]\n"
          "  loadgen client conn --port P --hello FILE --conc K --duration S [--warmup S]\n"
          "  loadgen client tput --port P --hello FILE --streams S --dir up|down --duration S [--warmup S]\n"
          "  loadgen client turn --port P --hello FILE --conns N --interval-ms MS --size B --duration S [--warmup S]\n"
          "  loadgen client idle --port P --hello FILE --conns N [--parallel K] [--hold S]\n");
  exit(2);
}

int main(int argc, char **argv) {
  if (argc < 2) usage();
  setup_process();
  if (strcmp(argv[1], "backend") == 0) {
    const char *ports_s = arg_str(argc, argv, "--ports", NULL);
    const char *mode_s = arg_str(argc, argv, "--mode", "reply");
    if (!ports_s) usage();
    uint16_t ports[MAX_PORTS];
    int nports = 0;
    char *copy = strdup(ports_s), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && nports < MAX_PORTS; t = strtok_r(NULL, ",", &save))
      ports[nports++] = (uint16_t)atoi(t);
    enum bmode mode;
    if (strcmp(mode_s, "reply") == 0) mode = B_REPLY;
    else if (strcmp(mode_s, "hold") == 0) mode = B_HOLD;
    else if (strcmp(mode_s, "sink") == 0) mode = B_SINK;
    else if (strcmp(mode_s, "source") == 0) mode = B_SOURCE;
    else if (strcmp(mode_s, "echo") == 0) mode = B_ECHO;
    else die("backend: unknown --mode %s", mode_s);
    return run_backend(ports, nports, mode, (uint32_t)arg_num(argc, argv, "--hello-bytes", 0),
                       arg_num(argc, argv, "--max-seconds", 3600));
  }
  if (strcmp(argv[1], "client") == 0 && argc >= 3) {
    if (strcmp(argv[2], "conn") == 0) return run_conn(argc, argv);
    if (strcmp(argv[2], "tput") == 0) return run_tput(argc, argv);
    if (strcmp(argv[2], "turn") == 0) return run_turn(argc, argv);
    if (strcmp(argv[2], "idle") == 0) return run_idle(argc, argv);
  }
  usage();
  return 2;
}
