// The Perl program that drives libguestfs (Sys::Guestfs, shipped with
// Debian's libguestfs-tools) on behalf of src/files/appliance.ts. It is the
// only code that talks to the appliance; it never parses a filesystem itself:
// every read happens inside the appliance VM, which opens the disks read-only.
//
// Protocol: one JSON request per line on stdin, one JSON reply per line on
// stdout ({"id", "ok"} or {"id", "error"}); every string is ASCII JSON whose
// \u00XX escapes stand for raw bytes (guest names are bytes, not text). File
// contents go out on fd 3, exactly the file's size per download (the caller
// knows it from an lstat of the read-only filesystem). End of stdin closes the handle, which
// stops the appliance; libguestfs's recovery process stops it too when this
// process is killed.

export const HELPER_SOURCE = String.raw`
use strict;
use warnings;
use Sys::Guestfs;
use JSON::PP;
use IO::Handle;
use POSIX ();

my $json = JSON::PP->new->ascii->canonical;
STDOUT->autoflush(1);
my $g = Sys::Guestfs->new();
$g->set_recovery_proc(1);

sub bytes_of { my ($s) = @_; utf8::downgrade($s); return $s; }
sub stat_of {
  my ($s) = @_;
  return { mode => $s->{st_mode} + 0, uid => $s->{st_uid} + 0, gid => $s->{st_gid} + 0, size => $s->{st_size} + 0,
           mtime => $s->{st_mtime_sec} + 0, mtimeNs => $s->{st_mtime_nsec} + 0, atime => $s->{st_atime_sec} + 0,
           atimeNs => $s->{st_atime_nsec} + 0, nlink => $s->{st_nlink} + 0, ino => $s->{st_ino} + 0 };
}
sub is_link { return (($_[0] & 0170000) == 0120000); }

my %ops;
$ops{add} = sub {
  my ($r) = @_;
  for my $d (@{ $r->{drives} }) {
    # For the nbd protocol the drive's name is the export's name.
    $g->add_drive(bytes_of($d->{export}), protocol => 'nbd', server => [ 'unix:' . bytes_of($d->{socket}) ], readonly => 1, format => 'raw');
  }
  return JSON::PP::true;
};
$ops{launch} = sub {
  my ($r) = @_;
  $g->set_backend(bytes_of($r->{backend})) if defined $r->{backend};
  $g->set_backend_settings([ map { bytes_of($_) } @{ $r->{backendSettings} } ]) if defined $r->{backendSettings};
  $g->set_memsize($r->{memsizeMiB}) if defined $r->{memsizeMiB};
  $g->launch();
  return { pid => ($g->get_pid() + 0) };
};
$ops{filesystems} = sub {
  my %fs = $g->list_filesystems();
  my @out;
  for my $dev (sort keys %fs) {
    my $label = eval { $g->vfs_label($dev) } // '';
    my $uuid = eval { $g->vfs_uuid($dev) } // '';
    my $size = eval { $g->blockdev_getsize64($dev) } // 0;
    push @out, { device => $dev, type => $fs{$dev}, label => $label, uuid => $uuid, size => $size + 0 };
  }
  return \@out;
};
$ops{inspect} = sub {
  my @roots = $g->inspect_os();
  my @out;
  for my $root (@roots) {
    my %mp = $g->inspect_get_mountpoints($root);
    my @mounts = map { [ $_, $mp{$_} ] } sort { length($a) <=> length($b) } keys %mp;
    push @out, { root => $root, product => (eval { $g->inspect_get_product_name($root) } // ''),
                 hostname => (eval { $g->inspect_get_hostname($root) } // ''), mounts => \@mounts };
  }
  return \@out;
};
$ops{mount} = sub {
  my ($r) = @_;
  for my $m (@{ $r->{mounts} }) {
    $g->mount_ro(bytes_of($m->[0]), bytes_of($m->[1]));
  }
  return JSON::PP::true;
};
$ops{lstat} = sub {
  my ($r) = @_;
  my $p = bytes_of($r->{path});
  my %st = $g->lstatns($p);
  my $s = stat_of(\%st);
  $s->{link} = $g->readlink($p) if is_link($s->{mode});
  return $s;
};
$ops{readdir} = sub {
  my ($r) = @_;
  my $p = bytes_of($r->{path});
  my @names = grep { $_ ne '.' && $_ ne '..' } map { $_->{name} } $g->readdir($p);
  die "too many entries (" . scalar(@names) . ")\n" if defined $r->{max} && @names > $r->{max};
  my @out;
  while (my @batch = splice(@names, 0, 400)) {
    my @stats = $g->lstatnslist($p, \@batch);
    my @links;
    for my $i (0 .. $#batch) {
      my $s = stat_of($stats[$i]);
      $s->{name} = $batch[$i];
      push @out, $s;
      push @links, $s if is_link($s->{mode});
    }
    if (@links) {
      my @targets = $g->readlinklist($p, [ map { $_->{name} } @links ]);
      $links[$_]->{link} = $targets[$_] for 0 .. $#links;
    }
  }
  return \@out;
};
# libguestfs downloads into a file name; fd 3 is a socket, which cannot be
# opened by name, so a forked copier moves the bytes from a pipe to fd 3.
$ops{download} = sub {
  my ($r) = @_;
  pipe(my $rd, my $wr) or die "pipe: $!\n";
  my $pid = fork();
  die "fork: $!\n" unless defined $pid;
  if ($pid == 0) {
    # The copier: never returns, and _exit skips the handle's destructor (which would stop the appliance).
    close $wr;
    open(my $out, '>&=', 3) or POSIX::_exit(1);
    my $buf;
    while (1) {
      my $n = sysread($rd, $buf, 1 << 16);
      POSIX::_exit(defined $n ? 0 : 1) if !$n;
      my $off = 0;
      while ($off < $n) {
        my $w = syswrite($out, $buf, $n - $off, $off);
        POSIX::_exit(1) unless defined $w;
        $off += $w;
      }
    }
  }
  close $rd;
  my $ok = eval { $g->download(bytes_of($r->{path}), '/dev/fd/' . fileno($wr)); 1 };
  my $err = $@;
  close $wr;
  waitpid($pid, 0);
  die $err unless $ok;
  die "copying the file out failed\n" if $? != 0;
  return JSON::PP::true;
};

while (my $line = <STDIN>) {
  my ($id, $res);
  my $ok = eval {
    my $req = $json->decode($line);
    $id = $req->{id};
    my $op = $ops{ $req->{op} } or die "unknown operation\n";
    $res = $op->($req);
    1;
  };
  if ($ok) {
    print STDOUT $json->encode({ id => $id, ok => $res }), "\n";
  } else {
    my $msg = "$@";
    $msg =~ s/\s+at \S+ line \d+.*$//s;
    $msg =~ s/\n.*$//s;
    $msg =~ s/^libguestfs: error: //;
    $msg =~ s/\s+$//;
    print STDOUT $json->encode({ id => $id, error => $msg }), "\n";
  }
}
$g->shutdown() if eval { $g->get_state() } ;
$g->close();
`;
