/* Holds one kind of kernel object, gets snapshotted and resumed, then
 * checks the object still behaves as it did: the engine_fds tests.
 * Usage: fd_objects MODE; prints "ready", waits for a file "go" in the
 * current directory, prints "MODE ok ..." or "MODE BAD ...". */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <pthread.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/syscall.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static const char *mode;
#define CHECK(c) do { if (!(c)) { printf("%s BAD line %d: %s (errno %d)\n", mode, __LINE__, #c, errno); fflush(stdout); exit(1); } } while (0)

static void wait_go(void) {
    printf("ready\n");
    fflush(stdout);
    while (access("go", F_OK) != 0) usleep(10000);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void pipes(void) {
    int p[2];
    CHECK(pipe(p) == 0);
    CHECK(write(p[1], "hello pipe", 10) == 10);
    unlink("fifo");
    CHECK(mkfifo("fifo", 0600) == 0);
    int f = open("fifo", O_RDWR);
    CHECK(f >= 0);
    CHECK(write(f, "fifo data", 9) == 9);
    wait_go();
    char b[64] = {0};
    CHECK(read(p[0], b, sizeof b) == 10 && memcmp(b, "hello pipe", 10) == 0);
    CHECK(read(f, b, sizeof b) == 9 && memcmp(b, "fifo data", 9) == 0);
    CHECK(write(p[1], "more", 4) == 4 && read(p[0], b, 4) == 4 && memcmp(b, "more", 4) == 0);
    printf("pipe ok\n");
}

static void eventfds(void) {
    int e = eventfd(7, EFD_NONBLOCK), s = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK);
    CHECK(e >= 0 && s >= 0);
    wait_go();
    uint64_t v = 0;
    CHECK(read(e, &v, 8) == 8 && v == 7);
    CHECK(read(e, &v, 8) < 0 && errno == EAGAIN);
    for (int i = 0; i < 3; i++) CHECK(read(s, &v, 8) == 8 && v == 1);
    CHECK(read(s, &v, 8) < 0 && errno == EAGAIN);
    printf("eventfd ok\n");
}

static void epolls(void) {
    int ep = epoll_create1(0), p[2], e = eventfd(0, EFD_NONBLOCK);
    CHECK(ep >= 0 && pipe(p) == 0 && e >= 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 111};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev) == 0);
    ev.events = EPOLLIN | EPOLLET;
    ev.data.u64 = 222;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, e, &ev) == 0);
    CHECK(write(p[1], "x", 1) == 1);
    wait_go();
    struct epoll_event out[4];
    CHECK(epoll_wait(ep, out, 4, 1000) == 1 && out[0].data.u64 == 111);
    uint64_t one = 1;
    CHECK(write(e, &one, 8) == 8);
    CHECK(epoll_wait(ep, out, 4, 1000) == 2);
    /* Registrations are keyed by fd number: DEL must find them. */
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, p[0], NULL) == 0);
    CHECK(epoll_wait(ep, out, 4, 0) == 0); /* edge-triggered: reported once */
    printf("epoll ok\n");
}

static void signalfds(void) {
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR1);
    sigaddset(&m, SIGUSR2);
    CHECK(sigprocmask(SIG_BLOCK, &m, NULL) == 0);
    int s = signalfd(-1, &m, SFD_NONBLOCK);
    CHECK(s >= 0);
    kill(getpid(), SIGUSR1);
    wait_go();
    struct signalfd_siginfo si;
    CHECK(read(s, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR1);
    kill(getpid(), SIGUSR2);
    CHECK(read(s, &si, sizeof si) == sizeof si && si.ssi_signo == SIGUSR2);
    CHECK(read(s, &si, sizeof si) < 0 && errno == EAGAIN);
    printf("signalfd ok\n");
}

static void timerfds(void) {
    int t = timerfd_create(CLOCK_MONOTONIC, 0);
    CHECK(t >= 0);
    struct itimerspec its = {{0, 50000000}, {0, 50000000}};
    CHECK(timerfd_settime(t, 0, &its, NULL) == 0);
    usleep(130000); /* two expirations left unread */
    wait_go();
    uint64_t n = 0;
    CHECK(read(t, &n, 8) == 8 && n >= 2);
    double t0 = now_ms();
    for (int i = 0; i < 10; i++) CHECK(read(t, &n, 8) == 8);
    double ms = now_ms() - t0;
    CHECK(ms > 400 && ms < 650);
    printf("timerfd ok period_ms=%.1f\n", ms / 10);
}

static void memfds(void) {
    int m = memfd_create("mydata", MFD_ALLOW_SEALING);
    CHECK(m >= 0 && write(m, "memfd contents", 14) == 14);
    char *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    CHECK(map != MAP_FAILED);
    CHECK(fcntl(m, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);
    CHECK(lseek(m, 6, SEEK_SET) == 6);
    wait_go();
    char b[32] = {0};
    CHECK(read(m, b, 8) == 8 && memcmp(b, "contents", 8) == 0);
    CHECK(fcntl(m, F_GET_SEALS) == (F_SEAL_SHRINK | F_SEAL_GROW));
    CHECK(ftruncate(m, 1) < 0 && errno == EPERM);
    CHECK(pwrite(m, "MEMFD", 5, 0) == 5 && memcmp(map, "MEMFD contents", 14) == 0);
    printf("memfd ok\n");
}

static int unix_listener(struct sockaddr_un *a, socklen_t len) {
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(l >= 0 && bind(l, (struct sockaddr *)a, len) == 0 && listen(l, 8) == 0);
    return l;
}

static void unixes(void) {
    int st[2], dg[2], sq[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, st) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_DGRAM, 0, dg) == 0);
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sq) == 0);
    CHECK(write(st[0], "stream bytes", 12) == 12 && write(st[1], "back", 4) == 4);
    CHECK(send(dg[0], "one", 3, 0) == 3 && send(dg[0], "two!", 4, 0) == 4);
    CHECK(send(sq[1], "pkt1", 4, 0) == 4 && send(sq[1], "pkt22", 5, 0) == 5);
    int on = 1;
    CHECK(setsockopt(st[1], SOL_SOCKET, SO_PASSCRED, &on, sizeof on) == 0);
    struct sockaddr_un pa = {.sun_family = AF_UNIX}, aa = {.sun_family = AF_UNIX};
    strcpy(pa.sun_path, "listen.sock");
    unlink(pa.sun_path);
    int lp = unix_listener(&pa, sizeof pa);
    snprintf(aa.sun_path + 1, sizeof aa.sun_path - 1, "umlctl-test-%d", getpid());
    socklen_t alen = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(aa.sun_path + 1);
    int la = unix_listener(&aa, alen);
    struct sockaddr_un da = {.sun_family = AF_UNIX};
    strcpy(da.sun_path, "dgram.sock");
    unlink(da.sun_path);
    int orphan[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, orphan) == 0);
    CHECK(write(orphan[0], "last words", 10) == 10);
    close(orphan[0]); /* the peer is gone; its bytes are still to read */
    int d = socket(AF_UNIX, SOCK_DGRAM, 0), sender = socket(AF_UNIX, SOCK_DGRAM, 0);
    CHECK(d >= 0 && bind(d, (struct sockaddr *)&da, sizeof da) == 0);
    CHECK(sendto(sender, "queued dgram", 12, 0, (struct sockaddr *)&da, sizeof da) == 12);
    close(sender);
    wait_go();
    char b[64] = {0};
    CHECK(read(st[1], b, sizeof b) == 12 && memcmp(b, "stream bytes", 12) == 0);
    CHECK(read(st[0], b, sizeof b) == 4 && memcmp(b, "back", 4) == 0);
    int v = 0;
    socklen_t vl = sizeof v;
    CHECK(getsockopt(st[1], SOL_SOCKET, SO_PASSCRED, &v, &vl) == 0 && v == 1);
    CHECK(recv(dg[1], b, sizeof b, 0) == 3 && recv(dg[1], b, sizeof b, 0) == 4 && memcmp(b, "two!", 4) == 0);
    CHECK(recv(sq[0], b, sizeof b, 0) == 4 && recv(sq[0], b, sizeof b, 0) == 5 && memcmp(b, "pkt22", 5) == 0);
    CHECK(write(st[1], "x", 1) == 1 && read(st[0], b, 1) == 1);
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&pa, sizeof pa) == 0);
    int s = accept(lp, NULL, NULL);
    CHECK(s >= 0 && write(c, "hi", 2) == 2 && read(s, b, 2) == 2);
    int c2 = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(connect(c2, (struct sockaddr *)&aa, alen) == 0 && accept(la, NULL, NULL) >= 0);
    CHECK(recv(d, b, sizeof b, 0) == 12 && memcmp(b, "queued dgram", 12) == 0);
    CHECK(read(orphan[1], b, sizeof b) == 10 && memcmp(b, "last words", 10) == 0);
    CHECK(read(orphan[1], b, sizeof b) == 0);
    printf("unix ok\n");
}

static void inets(void) {
    int l = socket(AF_INET, SOCK_STREAM, 0), on = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) == 0);
    CHECK(bind(l, (struct sockaddr *)&a, sizeof a) == 0 && listen(l, 16) == 0);
    socklen_t len = sizeof a;
    CHECK(getsockname(l, (struct sockaddr *)&a, &len) == 0);
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ua = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(bind(u, (struct sockaddr *)&ua, sizeof ua) == 0);
    len = sizeof ua;
    CHECK(getsockname(u, (struct sockaddr *)&ua, &len) == 0);
    printf("port %d\n", ntohs(a.sin_port));
    wait_go();
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&a, sizeof a) == 0);
    int s = accept(l, NULL, NULL);
    char b[8];
    CHECK(s >= 0 && write(c, "tcp", 3) == 3 && read(s, b, 3) == 3);
    int v = 0;
    socklen_t vl = sizeof v;
    CHECK(getsockopt(l, SOL_SOCKET, SO_REUSEADDR, &v, &vl) == 0 && v == 1);
    int u2 = socket(AF_INET, SOCK_DGRAM, 0);
    CHECK(sendto(u2, "udp", 3, 0, (struct sockaddr *)&ua, sizeof ua) == 3);
    CHECK(recv(u, b, sizeof b, 0) == 3 && memcmp(b, "udp", 3) == 0);
    printf("inet ok\n");
}

static void established(void) {
    int l = socket(AF_INET, SOCK_STREAM, 0), on = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    /* As servers do, so that connections in TIME_WAIT do not hold the port. */
    CHECK(setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) == 0);
    CHECK(bind(l, (struct sockaddr *)&a, sizeof a) == 0 && listen(l, 4) == 0);
    socklen_t len = sizeof a;
    CHECK(getsockname(l, (struct sockaddr *)&a, &len) == 0);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&a, sizeof a) == 0);
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    wait_go();
    char b[4];
    errno = 0;
    CHECK(read(c, b, 4) < 0 && errno == ECONNRESET);
    /* The listener still works. */
    int c2 = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c2, (struct sockaddr *)&a, sizeof a) == 0 && accept(l, NULL, NULL) >= 0);
    printf("established ok\n");
}

static volatile sig_atomic_t posix_ticks, alarm_ticks, bad_value;

static void on_rt(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    if (si->si_value.sival_int != 77) bad_value = 1;
    posix_ticks++;
}

static void on_alarm(int sig) { (void)sig; alarm_ticks++; }

static void timers(void) {
    struct sigaction sa = {.sa_sigaction = on_rt, .sa_flags = SA_SIGINFO | SA_RESTART};
    CHECK(sigaction(SIGRTMIN, &sa, NULL) == 0);
    signal(SIGALRM, on_alarm);
    struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN, .sigev_value.sival_int = 77};
    timer_t id1, id2;
    CHECK(timer_create(CLOCK_MONOTONIC, &ev, &id1) == 0);
    /* A second, disarmed timer: ids must come back as they were. */
    CHECK(timer_create(CLOCK_REALTIME, &ev, &id2) == 0);
    struct itimerspec its = {{0, 20000000}, {0, 20000000}};
    CHECK(timer_settime(id1, 0, &its, NULL) == 0);
    struct itimerval iv = {{0, 100000}, {0, 100000}};
    CHECK(setitimer(ITIMER_REAL, &iv, NULL) == 0);
    wait_go();
    int p0 = posix_ticks, a0 = alarm_ticks;
    double t0 = now_ms();
    while (now_ms() - t0 < 1000) usleep(1000);
    int p = posix_ticks - p0, a = alarm_ticks - a0;
    struct itimerspec cur;
    CHECK(timer_gettime(id1, &cur) == 0 && cur.it_interval.tv_nsec == 20000000);
    CHECK(timer_gettime(id2, &cur) == 0 && cur.it_value.tv_nsec == 0 && cur.it_value.tv_sec == 0);
    CHECK(!bad_value);
    CHECK(p >= 40 && p <= 60 && a >= 8 && a <= 12);
    printf("timers ok posix=%d itimer=%d\n", p, a);
}

static int lock_conflicts(const char *path, int cmd) {
    /* A fresh description (and, for POSIX locks, another process) asks. */
    int fd = open(path, O_RDWR);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    if (cmd == F_SETLK) {
        pid_t c = fork();
        if (c == 0) _exit(fcntl(fd, F_SETLK, &fl) < 0 && (errno == EAGAIN || errno == EACCES) ? 0 : 1);
        int st;
        waitpid(c, &st, 0);
        close(fd);
        return WIFEXITED(st) && WEXITSTATUS(st) == 0;
    }
    int r = cmd == F_OFD_SETLK ? fcntl(fd, F_OFD_SETLK, &fl) : flock(fd, LOCK_EX | LOCK_NB);
    int busy = r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    close(fd);
    return busy;
}

static void locks(void) {
    int a = open("posix.lock", O_RDWR | O_CREAT, 0600);
    int b = open("flock.lock", O_RDWR | O_CREAT, 0600);
    int c = open("ofd.lock", O_RDWR | O_CREAT, 0600);
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
    CHECK(fcntl(a, F_SETLK, &fl) == 0);
    CHECK(flock(b, LOCK_EX) == 0);
    fl.l_pid = 0;
    CHECK(fcntl(c, F_OFD_SETLK, &fl) == 0);
    wait_go();
    CHECK(lock_conflicts("posix.lock", F_SETLK));
    CHECK(lock_conflicts("flock.lock", 0));
    CHECK(lock_conflicts("ofd.lock", F_OFD_SETLK));
    printf("locks ok\n");
}

/* A unix stream between a parent (listening on a path) and its child,
 * with bytes in flight both ways at the snapshot. */
static void unix_tree(void) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, "tree.sock");
    unlink(a.sun_path);
    int l = unix_listener(&a, sizeof a);
    pid_t c = fork();
    if (c == 0) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        CHECK(connect(s, (struct sockaddr *)&a, sizeof a) == 0);
        CHECK(write(s, "to parent", 9) == 9);
        while (access("go", F_OK) != 0) usleep(10000);
        char b[16] = {0};
        CHECK(read(s, b, sizeof b) == 8 && memcmp(b, "to child", 8) == 0); /* after resume */
        CHECK(write(s, "bye", 3) == 3);
        _exit(0);
    }
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    usleep(100000); /* the child's bytes are queued */
    CHECK(write(s, "to child", 8) == 8);
    wait_go();
    char b[16] = {0};
    CHECK(read(s, b, 9) == 9 && memcmp(b, "to parent", 9) == 0);
    CHECK(read(s, b, 3) == 3 && memcmp(b, "bye", 3) == 0);
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    printf("unixtree ok\n");
}

/* A child whose stdin is a socket to its parent (as UML's stubs have):
 * a std stream, but one that leads inside the snapshot. */
static void std_socket(void) {
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    pid_t c = fork();
    if (c == 0) {
        CHECK(dup2(sv[1], 0) == 0);
        close(sv[0]);
        close(sv[1]);
        while (access("go", F_OK) != 0) usleep(10000);
        char b[8] = {0};
        CHECK(read(0, b, 5) == 5 && memcmp(b, "hello", 5) == 0);
        CHECK(write(0, "reply", 5) == 5);
        _exit(0);
    }
    CHECK(write(sv[0], "hello", 5) == 5);
    wait_go();
    char b[8] = {0};
    CHECK(read(sv[0], b, 5) == 5 && memcmp(b, "reply", 5) == 0);
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    printf("stdsock ok\n");
}

/* A parent and child sharing anonymous memory and a file offset. */
static void shared(void) {
    volatile int *shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(shm != MAP_FAILED);
    int f = open("shared.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(f >= 0 && write(f, "start ", 6) == 6);
    /* A deleted file, held open and mapped shared by both (as UML holds
     * its guest memory): fd and mappings must stay one object. */
    int ram = open("ram", O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(ram >= 0 && ftruncate(ram, 4096) == 0);
    volatile char *rm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, ram, 0);
    CHECK(rm != MAP_FAILED && unlink("ram") == 0);
    rm[0] = 'p';
    shm[0] = 1;
    pid_t c = fork();
    if (c == 0) {
        while (shm[1] == 0) usleep(1000); /* the parent's go */
        CHECK(write(f, "child ", 6) == 6);
        rm[1] = 'c';
        shm[2] = 42;
        _exit(0);
    }
    wait_go();
    shm[1] = 1;
    while (shm[2] != 42) usleep(1000);
    CHECK(write(f, "parent", 6) == 6);
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char b[32] = {0};
    CHECK(pread(f, b, sizeof b, 0) == 18 && memcmp(b, "start child parent", 18) == 0);
    CHECK(pread(ram, b, 2, 0) == 2 && b[0] == 'p' && b[1] == 'c' && rm[1] == 'c');
    printf("shared ok\n");
}

static volatile sig_atomic_t io_fd = -1;

static void on_io(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    io_fd = si->si_fd;
}

/* Signal-driven I/O: the pipe's owner and signal come back. */
static void async_io(void) {
    struct sigaction sa = {.sa_sigaction = on_io, .sa_flags = SA_SIGINFO};
    CHECK(sigaction(SIGUSR2, &sa, NULL) == 0);
    int p[2];
    CHECK(pipe(p) == 0);
    CHECK(fcntl(p[0], F_SETOWN, getpid()) == 0 && fcntl(p[0], F_SETSIG, SIGUSR2) == 0);
    CHECK(fcntl(p[0], F_SETFL, O_ASYNC | O_NONBLOCK) == 0);
    wait_go();
    CHECK(fcntl(p[0], F_GETOWN) == getpid() && fcntl(p[0], F_GETSIG) == SIGUSR2);
    CHECK((fcntl(p[0], F_GETFL) & O_ASYNC) != 0);
    CHECK(write(p[1], "x", 1) == 1);
    for (int i = 0; i < 1000 && io_fd < 0; i++) usleep(1000);
    CHECK(io_fd == p[0]);
    printf("async ok\n");
}

/* A filter failing uname() with EPERM, installed before a second thread
 * is made (which inherits it): both must still be confined. */
static void *uname_in_thread(void *arg) {
    struct utsname u;
    (void)arg;
    return (void *)(long)(uname(&u) < 0 && errno == EPERM);
}

static void seccomp_filter(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_uname, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = 4, .filter = f};
    CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
    CHECK(syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) == 0);
    struct utsname u;
    CHECK(uname(&u) < 0 && errno == EPERM);
    wait_go();
    CHECK(uname(&u) < 0 && errno == EPERM);
    CHECK(prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1);
    pthread_t t;
    void *ok = NULL;
    CHECK(pthread_create(&t, NULL, uname_in_thread, NULL) == 0 && pthread_join(t, &ok) == 0 && ok);
    printf("seccomp ok\n");
}

/* Strict mode: only read, write, exit, sigreturn. Snapshots refuse it. */
static void strict(void) {
    int p[2];
    CHECK(pipe(p) == 0);
    printf("ready\n");
    fflush(stdout);
    CHECK(prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) == 0);
    char b;
    read(p[0], &b, 1);
    syscall(SYS_exit, 0);
}

static sigjmp_buf fault_jmp;

static void on_segv(int sig) {
    (void)sig;
    siglongjmp(fault_jmp, 1);
}

/* A guard page (MADV_GUARD_INSTALL, as glibc 2.41 puts below thread
 * stacks) between two pages of data: it must fault again after resume. */
static void guard_pages(void) {
    char *m = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    memset(m, 'a', 4096);
    memset(m + 8192, 'c', 4096);
    CHECK(madvise(m + 4096, 4096, 102 /* MADV_GUARD_INSTALL */) == 0);
    wait_go();
    CHECK(m[0] == 'a' && m[8191 + 4096] == 'c');
    signal(SIGSEGV, on_segv);
    volatile char *g = m + 4096;
    int faulted = 0;
    if (sigsetjmp(fault_jmp, 1) == 0)
        (void)*g;
    else
        faulted = 1;
    CHECK(faulted);
    printf("guard ok\n");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "pipe")) pipes();
    else if (!strcmp(mode, "eventfd")) eventfds();
    else if (!strcmp(mode, "epoll")) epolls();
    else if (!strcmp(mode, "signalfd")) signalfds();
    else if (!strcmp(mode, "timerfd")) timerfds();
    else if (!strcmp(mode, "memfd")) memfds();
    else if (!strcmp(mode, "unix")) unixes();
    else if (!strcmp(mode, "inet")) inets();
    else if (!strcmp(mode, "established")) established();
    else if (!strcmp(mode, "timers")) timers();
    else if (!strcmp(mode, "locks")) locks();
    else if (!strcmp(mode, "shared")) shared();
    else if (!strcmp(mode, "unixtree")) unix_tree();
    else if (!strcmp(mode, "stdsock")) std_socket();
    else if (!strcmp(mode, "guard")) guard_pages();
    else if (!strcmp(mode, "async")) async_io();
    else if (!strcmp(mode, "seccomp")) seccomp_filter();
    else if (!strcmp(mode, "strict")) strict();
    else { printf("unknown mode %s\n", mode); return 2; }
    return 0;
}
